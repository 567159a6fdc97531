#!/usr/bin/env bash
# One real training step of configs/recipes/fam-24b-4x80gb.yaml (ZeRO-3 over 4 GPUs, optimizer
# offloaded to host memory, recompute, seq 8192): byte-level shards of Python's standard library,
# then torchrun with 1 step of 4 sequences (micro-batch 1, one per rank), no checkpoint, no MLflow,
# no validation. pipeline.memory's estimate of the same step comes first, the measured peaks last.
#
#   GPU machine, from the repo root, after the wheel install of ../shared/gpu/README.md:
#       bash benchmarks/big_step.sh
#   CPU dry run of the same path (gloo, DeepSpeed's CPU accelerator), the model shrunk:
#       NPROC=2 SEQ=512 PYTHON=.venv/bin/python EXTRA="--model.num_layers=2 --model.hidden_size=256 \
#           --model.num_attention_heads=4 --model.vocab_size=512 --model.block_size=128" bash benchmarks/big_step.sh
#
# Settings (environment): NPROC ranks (4), SEQ tokens (8192), CONFIG, OUT work folder
# (/tmp/famtron-big-step; shards are reused), PYTHON (python3), EXTRA more --section.key=value.
# Host memory is the tight resource (~116 GiB per rank with the offloaded optimizer, see
# pipeline/memory/estimate.py), so: the offloaded AdamW gets the cores per rank (torchrun would set
# OMP_NUM_THREADS=1), and torch.compile builds its kernels in-process instead of in a pool of up
# to 32 worker processes per rank (a few hundred MiB each).
set -euo pipefail
NPROC=${NPROC:-4}
SEQ=${SEQ:-8192}
CONFIG=${CONFIG:-configs/recipes/fam-24b-4x80gb.yaml}
OUT=${OUT:-/tmp/famtron-big-step}
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
echo "host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo) GiB RAM;" \
     "$NPROC ranks x $OMP_NUM_THREADS threads"
data=$OUT/stdlib-byte-$SEQ
$PYTHON -m pipeline.memory --config "$CONFIG" --dp "$NPROC" --micro-batch 1 --global-batch "$NPROC" \
    --seq-len "$SEQ" || true  # exit status 1: "does not fit"
started=$(date +%s)

[ -f "$data/train/manifest.json" ] ||
    $PYTHON -m data_prep.shard --input stdlib --tokenizer byte --seq-len "$SEQ" --output "$data" --no-progress
prepared=$(date +%s)

rc=0
# shellcheck disable=SC2086  # EXTRA is a list of overrides
$PYTHON -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pipeline.train --config "$CONFIG" \
    --data.train_manifest="$data/train/manifest.json" --data.valid_manifest=null --data.seq_len="$SEQ" \
    --data.micro_batch_size=1 --data.global_batch_size="$NPROC" --train.steps=1 --optim.warmup_steps=1 \
    --train.log_interval_steps=1 --train.progress_bar=false --train.run_dir="$OUT/run" \
    --checkpoint.enabled=false --tracking.enabled=false ${EXTRA:-} || rc=$?
trained=$(date +%s)

echo "seconds: data $((prepared - started)), training run $((trained - prepared)) (start-up, 1 step, exit);" \
     "exit status $rc"
[ "$rc" = 0 ] && $PYTHON - "$OUT/run/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
gpu = "n/a" if s["peak_gpu_gib"] is None else f"{s['peak_gpu_gib']:.2f} GiB"
print(f"measured: status {s['status']}, loss {s['final_loss']:.4f}, peak GPU allocated {gpu} (max over ranks), "
      f"host RSS {s['peak_host_gib']:.1f} GiB (max over ranks), {s['peak_host_node_gib']:.1f} GiB (sum over ranks)")
EOF
exit "$rc"
