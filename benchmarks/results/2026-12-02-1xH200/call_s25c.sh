# Session 25, call C (warm after B): pytest -m gpu, the whole GPU suite in one process, shuffled (seed 25), on
# 30c6128 (the first GPU run of 47c552b's and 30c6128's shared test helpers). Sent as one command line.
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s25
SEED=25 timeout 590 bash benchmarks/fam_speed.sh "$OUT/s25c" tests
echo "call: $((SECONDS - start)) s"
