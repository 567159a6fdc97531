# Session 21, call C (fresh machine, the session's last GPU time): the captured-slots test again (its broken variant
# now fails loudly: autograd sees the block K/V load into a held buffer), then fam-1b / bswa-1b at 8k (micro-batch
# 4) and 32k (micro-batch 2, recompute) in one process, with this commit's defaults.
set -u
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
touch /tmp/site/.famtron-wheels
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI=
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-s21 INDUCTOR_CACHE=$PWD/.inductor-s21
timeout 110 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu_slots.py -k in_flight \
    > "$OUT/pytest_gpu_slots.log" 2>&1
echo "pytest: rc $?"; tail -n 4 "$OUT/pytest_gpu_slots.log"
timeout 370 python3 -m benchmarks.train_step --configs fam-1b bswa-1b --seq-lens 8192 32768 --micro-batch 4 2 \
    --recompute auto --results-dir "$OUT" --json "$OUT/ratios_short.json" > "$OUT/ratios_short.log" 2>&1
echo "ratios: rc $?"; grep -h "^|" "$OUT/ratios_short.log"
echo "call: $((SECONDS - start)) s"
