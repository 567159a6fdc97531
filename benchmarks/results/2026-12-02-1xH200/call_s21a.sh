# Session 21, call A (fresh machine): fam-1b and bswa-1b at 8k, micro-batch 4, profiled: the scan's keys/values
# buffers held for its backward (new default) and reloaded (as before), then the steps compiled with combo kernels.
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s21
timeout 570 bash benchmarks/fam_speed.sh "$OUT" blocks combo
echo "call: $((SECONDS - start)) s"
