# Session 24, call B (a fresh machine: A's had gone back): issue 13's fam / bswa rows in one process on c57e021,
# the scan's defaults (flash steps, separate first step), with the 8k rows at micro-batch 6 (call A: 0.908 there
# against 0.89-0.90 at 4); 32k, 64k, 128k at micro-batch 2 with recompute, as before. Sent as one command line.
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s24
SCAN_FLAGS="--micro-batch 6 2 2 2" timeout 585 bash benchmarks/fam_speed.sh "$OUT/s24b" ratios
echo "call: $((SECONDS - start)) s"
