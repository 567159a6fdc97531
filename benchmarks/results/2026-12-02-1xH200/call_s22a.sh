# Session 22, call A: fam-1b and bswa-1b at 8k, micro-batch 4, profiled, with each profiled step's Chrome trace
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s22
TRACE=1 MB=4 timeout 540 bash benchmarks/fam_speed.sh "$OUT/s22a" combo
ls -la "$OUT/s22a" "$OUT/s22a/traces"
echo "call: $((SECONDS - start)) s"
