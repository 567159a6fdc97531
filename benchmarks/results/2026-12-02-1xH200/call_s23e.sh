# Session 23, call E (warm after D): pytest -m gpu in a shuffled order (seed 23), on the same commit.
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s23
SEED=23 timeout 585 bash benchmarks/fam_speed.sh "$OUT/s23e" tests
grep -h "passed\|failed\|SKIPPED" "$OUT/s23e/pytest_gpu.log" | tail -n 4
echo "call: $((SECONDS - start)) s"
