# Session 22, call C: pytest -m gpu, the whole GPU suite in one process, in a shuffled order (seed 22).
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s22
ORDER=shuffle:22 timeout 580 bash benchmarks/fam_speed.sh "$OUT" tests
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -n 5
echo "call: $((SECONDS - start)) s"
