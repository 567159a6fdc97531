# Session 22, call D (warm from call B): fam-1b and bswa-1b at 32k, micro-batch 2, both with layer recompute
# (in call B the memory rule of --recompute auto ran bswa-1b without it: its RoPE tables no longer fill 18 layers).
set -u
start=$SECONDS
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI=
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-s22
timeout 230 python3 -m benchmarks.train_step --configs fam-1b bswa-1b --seq-lens 32768 --micro-batch 2 \
    --recompute on --results-dir "$OUT" --json "$OUT/ratios_32k_recompute.json" > "$OUT/ratios_32k_recompute.log" 2>&1
echo "train_step: rc $?"; grep -h "^|" "$OUT/ratios_32k_recompute.log"
echo "call: $((SECONDS - start)) s"
