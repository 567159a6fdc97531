# Session 23, call A (fresh machine): the scan's attention backward, flash as today against deferred
# (benchmarks.step_attention_probe: fam-1b's layer at 8k and 64k, micro-batch 1 and 4), on 2a50e74.
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s23
timeout 500 bash benchmarks/fam_speed.sh "$OUT/s23a" attention
tail -n 5 "$OUT/s23a/step_attention.log"
echo "call: $((SECONDS - start)) s"
