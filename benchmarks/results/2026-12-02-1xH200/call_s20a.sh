# Session 20, call A (fresh machine): issue 13's fam-1b / bswa-1b rows at all four lengths in one process,
# 8k at micro-batch 4, 32k, 64k and 128k at micro-batch 2 (recompute auto), on the code of this commit.
set -u
start=$SECONDS
timeout 585 bash benchmarks/fam_speed.sh "$OUT" ratios
echo "call: $((SECONDS - start)) s"
