# Session 25, call B (warm after A, the same inductor cache): fam-1b, bswa-1b and dense-1b at 64k and 8k,
# micro-batch 1, each with the plain anchor beside it (one process per length), then fam-1b and bswa-1b at 8k,
# micro-batch 6, profiled (GPU busy). 30c6128 with the `profile` phase taking MB. Sent as one command line.
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s25
SEQS=65536 timeout 300 bash benchmarks/fam_speed.sh "$OUT/s25b" table
echo "at $((SECONDS - start)) s"
SEQS=8192 timeout 200 bash benchmarks/fam_speed.sh "$OUT/s25b" table
echo "at $((SECONDS - start)) s"
MB=6 timeout $((560 - SECONDS + start)) bash benchmarks/fam_speed.sh "$OUT/s25b" profile
echo "call: $((SECONDS - start)) s"
