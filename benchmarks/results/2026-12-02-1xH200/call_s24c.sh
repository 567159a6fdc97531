# Session 24, call C (warm after B): pytest -m gpu, the whole GPU suite in one process, shuffled (seed 24), on
# ba7e9da (c57e021 with the cuDNN test's sizes fixed). Sent as one command line.
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s24
SEED=24 timeout 590 bash benchmarks/fam_speed.sh "$OUT/s24c" tests
grep -h "passed\|failed\|SKIPPED\|bf16 scan\|^FAILED" "$OUT/s24c/pytest_gpu.log" | tail -n 8
echo "call: $((SECONDS - start)) s"
