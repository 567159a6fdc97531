# Session 25, call A (a fresh machine; the first try got none): issue 13's fam / bswa rows in one process on
# 30c6128, the `ratios` phase as it stands (8k at micro-batch 6, no recompute; 32k-128k at 2, recompute).
# Sent as one command line.
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s25
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 585 bash benchmarks/fam_speed.sh "$OUT/s25a" ratios
echo "call: $((SECONDS - start)) s"
