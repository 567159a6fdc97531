# Session 23, call B (warm after A): issue 13's fam / bswa rows (8k micro-batch 4 no recompute; 32k, 64k,
# 128k micro-batch 2 with recompute), one process, on 2a50e74 (with d08fcd5, the scan's constants per length).
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s23
timeout 585 bash benchmarks/fam_speed.sh "$OUT/s23b" ratios
echo "call: $((SECONDS - start)) s"
