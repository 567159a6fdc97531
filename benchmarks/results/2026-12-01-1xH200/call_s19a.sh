# Session 19, call A: fam-1b and bswa-1b at 8k, micro-batch 4, profiled, with inductor's generated code
# (the block K/V gradients in the keys' layout, flash's output and output gradient in its own), then the
# GPU suite in reverse order, in the time left of the call's 600 s.
set -u
start=$SECONDS
MB=4 bash benchmarks/fam_speed.sh "$OUT" codegen
ORDER=reverse timeout $((585 - (SECONDS - start))) bash benchmarks/fam_speed.sh "$OUT" tests
echo "call: $((SECONDS - start)) s"
