# Session 21, call B: the GPU tests of the scan (GPU path against the CPU's fp32 path, captured slots, memory
# estimate against the measured peak) on this commit: combo kernels and held keys/values buffers, the new defaults.
set -u
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI=
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-s21
timeout 560 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_gpu_slots.py \
    tests/test_memory.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest: rc $?"; tail -n 15 "$OUT/pytest_gpu.log"
echo "call: $((SECONDS - start)) s"
