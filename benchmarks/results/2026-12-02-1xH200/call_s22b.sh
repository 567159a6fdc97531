# Session 22, call B: issue 13's fam / bswa rows at 8k (micro-batch 4), 32k, 64k and 128k (micro-batch 2,
# recompute) in one process, on the commit whose layers share one forward's RoPE tables (model/rope.py).
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s22
timeout 580 bash benchmarks/fam_speed.sh "$OUT" ratios
echo "call: $((SECONDS - start)) s"
