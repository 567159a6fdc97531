# Session 22, call E (warm): fam-1b and bswa-1b at 8k, micro-batch 4, profiled (GPU busy, kernels, idle gaps),
# on the commit whose layers share one forward's RoPE tables; compare call A (the commit before).
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s22
MB=4 timeout 250 bash benchmarks/fam_speed.sh "$OUT/s22e" combo
grep -h "idle .* ms a step" "$OUT/s22e/combo.log"
echo "call: $((SECONDS - start)) s"
