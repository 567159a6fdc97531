# Session 23, call F (warm after E): the 8k rows at micro-batch 4 and 6, no recompute, 10 timed steps (ratios8k).
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s23
timeout 560 bash benchmarks/fam_speed.sh "$OUT/s23f" ratios8k
echo "call: $((SECONDS - start)) s"
