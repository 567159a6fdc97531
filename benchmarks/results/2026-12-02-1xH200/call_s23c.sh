# Session 23, call C (fresh machine): the Triton attention backward (model/step_attention_kernel.py) on a GPU:
# its tests, then the scan step's attention by kernel (backends: flash as today, flash + the Triton backward,
# cuDNN, memory-efficient), one layer at 8k and 64k, micro-batch 2 and 4.
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s23 TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-s23
mkdir -p "$OUT/s23c"
timeout 200 python3 -m pytest -m gpu -q -s -rs -p no:cacheprovider tests/test_gpu_kernel.py > "$OUT/s23c/pytest_kernel.log" 2>&1
echo "kernel tests: rc $?"; grep -h "passed\|failed\|Error\|kernel vs\|bf16 scan" "$OUT/s23c/pytest_kernel.log" | tail -n 6
timeout 200 bash benchmarks/fam_speed.sh "$OUT/s23c" backends
tail -n 3 "$OUT/s23c/step_backends.log"
echo "call: $((SECONDS - start)) s"
