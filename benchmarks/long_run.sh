#!/usr/bin/env bash
# A million-token training run of fam-1b on one GPU (issue 14: "Training at length"), in phases
# that each fit a time-limited job. Byte-level shards of Python's standard library, 1,048,576
# tokens per sample, one sample per step, micro-chunks of CHUNK tokens in MODE
# (docs/fam.md "Micro-chunks"), every step's loss logged to MLflow (sqlite in WORK).
#
#   GPU machine, from the repo root, after the wheel install of ../shared/gpu/README.md, MLflow's
#   wheels included (the GPU image lacks them; seen working there on 2026-11-29, 37 MB in all):
#       EXTRA_WHEELS="mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 alembic mako sqlalchemy
#           cachetools==7.3.3 databricks-sdk fastapi gitpython gitdb smmap importlib_metadata==9.1.0
#           opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
#           python-dotenv sqlparse starlette uvicorn cryptography cffi pycparser" bash ../shared/gpu/wheelhouse.sh
#       bash benchmarks/long_run.sh first   # shards, then steps 1..FIRST (checkpoints every CHECK)
#       bash benchmarks/long_run.sh rest    # resumes the newest checkpoint and trains to STEPS
#       bash benchmarks/long_run.sh check   # resumes a copy of step CHECK's checkpoint, trains to
#                                           # FIRST, prints its losses beside the first run's
#   On one H200 the 20 steps fit one process (15 min, 8k micro-chunks without recompute, 34k tokens/s;
#   benchmarks/results/2026-11-30-1xH200), and the check can run beside it on a second GPU once step 10 is saved:
#       CHUNK=8192 FIRST=20 CHECK=10 EXTRA="--model.recompute=false --train.eval_interval_steps=10" \
#           bash benchmarks/long_run.sh first
#       CUDA_VISIBLE_DEVICES=1 CHUNK=8192 FIRST=14 CHECK=10 EXTRA="..." bash benchmarks/long_run.sh check
#   CPU dry run of the same path, the model and the sequence shrunk:
#       PYTHON=.venv/bin/python SEQ=2048 CHUNK=512 STEPS=6 FIRST=4 CHECK=2 INPUT=/tmp/some-text-folder \
#       EXTRA="--model.num_layers=2 --model.hidden_size=64 --model.num_attention_heads=2 --model.block_size=256 \
#           --model.fam_len=16 --model.vocab_size=512" bash benchmarks/long_run.sh first   # (then rest, check)
#
# Settings (environment): SEQ (1048576), CHUNK (16384), MODE (truncated | exact), STEPS (20),
# FIRST (10), CHECK (5), VOCAB (32000, as benchmarks.train_step's rows; the byte data uses 256 ids),
# WORK (runs/long), INPUT (stdlib), CONFIG, PYTHON (python3), EXTRA more --section.key=value.
set -euo pipefail
PYTHON=${PYTHON:-python3}
SEQ=${SEQ:-1048576}
CHUNK=${CHUNK:-16384}
MODE=${MODE:-truncated}
STEPS=${STEPS:-20}
FIRST=${FIRST:-10}
CHECK=${CHECK:-5}
VOCAB=${VOCAB:-32000}
WORK=${WORK:-runs/long}
INPUT=${INPUT:-stdlib}
CONFIG=${CONFIG:-configs/recipes/fam-1b-1m-1x80gb.yaml}
data=$WORK/data
uri=sqlite:///$(realpath -m "$WORK")/mlflow.db
# the check has its own store: a resume reopens the checkpoint's MLflow run, which would skip steps it has
check_uri=sqlite:///$(realpath -m "$WORK")/check/mlflow.db

train() {
    # shellcheck disable=SC2086  # EXTRA is a list of overrides
    $PYTHON -m pipeline.train --config "$CONFIG" --model.vocab_size="$VOCAB" --data.seq_len="$SEQ" \
        --data.train_manifest="$data/train/manifest.json" --data.valid_manifest="$data/valid/manifest.json" \
        --train.steps="$STEPS" --optim.warmup_steps=4 --train.micro_chunk_len="$CHUNK" \
        --train.micro_chunk_mode="$MODE" --train.log_interval_steps=1 --train.eval_interval_steps="$FIRST" \
        --train.eval_steps=1 --checkpoint.save_interval_steps="$CHECK" --checkpoint.keep_last=4 \
        --tracking.tracking_uri="$uri" --tracking.experiment=famtron-long $EXTRA "$@"
}

losses() {  # the MLflow loss and val_loss of both runs, step by step, from CHECK+1 to FIRST
    $PYTHON - "$uri" "$check_uri" "$CHECK" "$FIRST" <<'EOF'
import sys
from mlflow.tracking import MlflowClient

check, first = int(sys.argv[3]), int(sys.argv[4])
runs = []
for uri, name in ((sys.argv[1], "long"), (sys.argv[2], f"long-resumed-at-{check}")):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("famtron-long")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    runs.append((client, run.info.run_id))
for key in ("loss", "val_loss"):
    hist = [{m.step: m.value for m in client.get_metric_history(r, key)} for client, r in runs]
    steps = [s for s in sorted(hist[1]) if check < s <= first and s in hist[0]]
    print(f"{key}: step | first run | resumed at step {check} | difference")
    for s in steps:
        print(f"  {s:3d} | {hist[0][s]:.6f} | {hist[1][s]:.6f} | {hist[1][s] - hist[0][s]:+.2e}")
    if not steps:
        print("  no common steps")
EOF
}

case ${1:-} in
first)
    [ -f "$data/train/manifest.json" ] ||
        $PYTHON -m data_prep.shard --input "$INPUT" --tokenizer byte --seq-len "$SEQ" --valid-fraction 0.1 \
            --output "$data" --no-progress
    train --train.run_dir="$WORK/run" --tracking.run_name=long --train.exit_after_steps="$FIRST" ;;
rest)
    train --train.run_dir="$WORK/run" --tracking.run_name=long ;;
check)
    step=$(printf 'step_%08d' "$CHECK")
    [ -d "$WORK/run/checkpoints/$step" ] || {
        echo "long_run.sh check: no checkpoint $WORK/run/checkpoints/$step; run 'first' with the same CHECK" \
            "(checkpoints every CHECK steps), or set CHECK to a step listed there" >&2; exit 1; }
    rm -rf "$WORK/check" && mkdir -p "$WORK/check/checkpoints"
    cp -al "$WORK/run/checkpoints/$step" "$WORK/check/checkpoints/"  # hard links: the first run may delete its copy
    train --train.run_dir="$WORK/check" --tracking.run_name="long-resumed-at-$CHECK" \
        --tracking.tracking_uri="$check_uri" \
        --checkpoint.resume="$WORK/check/checkpoints/$step" --train.exit_after_steps=$((FIRST - CHECK)) \
        --checkpoint.save_interval_steps=0
    losses ;;
*)
    echo "usage: bash benchmarks/long_run.sh first|rest|check (settings: see the header)" >&2; exit 2 ;;
esac
