# Session 25, call D (warm after C, with the session's last device time): the 32k table row, micro-batch 1,
# with the anchor. Sent as one command line.
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s25
SEQS=32768 timeout 200 bash benchmarks/fam_speed.sh "$OUT/s25d" table
echo "call: $((SECONDS - start)) s"
