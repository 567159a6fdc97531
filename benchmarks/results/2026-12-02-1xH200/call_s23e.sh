# Session 23, call E (warm after D): the 8k rows at micro-batch 4 and 6, 10 timed steps (ratios8k), then the
# scan step's attention by SDPA kernel (backends: flash, cuDNN, memory-efficient).
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s23
timeout 420 bash benchmarks/fam_speed.sh "$OUT/s23e" ratios8k
timeout $((570 - (SECONDS - start))) bash benchmarks/fam_speed.sh "$OUT/s23e" backends
echo "call: $((SECONDS - start)) s"
