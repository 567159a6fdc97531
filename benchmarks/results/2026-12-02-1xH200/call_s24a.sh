# Session 24, call A (fresh machine): the GPU tests of the scan's cuDNN attention (tests/test_gpu_cudnn.py) and of
# the merged first step (tests/test_gpu_first_step.py, never run before), then fam-1b against bswa-1b at 8k,
# micro-batch 4, no recompute, one process per scan variant: cuDNN steps, the merged first step, both; and both at
# micro-batch 6. Session 23's flash steps, separate first step (call D, 685a4db, another machine): 0.897.
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s24
TESTS="tests/test_gpu_cudnn.py tests/test_gpu_first_step.py" ORDER=file timeout 200 \
    bash benchmarks/fam_speed.sh "$OUT/s24a/tests" tests
grep -h "passed\|failed\|Error\|bf16 scan" "$OUT/s24a/tests/pytest_gpu.log" | tail -n 8
echo "tests: $((SECONDS - start)) s"
run() {  # name, micro-batch, flags...
    local name=$1 mb=$2; shift 2
    SCAN_FLAGS="$*" BATCHES=$mb timeout $((570 - (SECONDS - start))) \
        bash benchmarks/fam_speed.sh "$OUT/s24a/$name" batches
    echo "$name: $((SECONDS - start)) s"
}
run cudnn 4 --recompute off --scan-attention cudnn
run merged 4 --recompute off --scan-first-step merged
run both 4 --recompute off --scan-attention cudnn --scan-first-step merged
run both-mb6 6 --recompute off --scan-attention cudnn --scan-first-step merged
echo "call: $((SECONDS - start)) s"
