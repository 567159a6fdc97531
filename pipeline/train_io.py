"""What a training run reads and writes around pipeline/train.py's loop: the input manifests
checked before any process group exists, checkpoints (pipeline/checkpoint.py), the MLflow run with
the resolved config, and at the end the summary JSON and loss curve. `tr` is pipeline.train.Trainer.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from model.config import describe
from pipeline import config as config_lib
from pipeline.checkpoint import save_checkpoint
from pipeline.distributed import Ranks
from pipeline.fault import write_status
from pipeline.tracking import Tracker, build_loss_curve, build_tags
from pipeline.trainer_state import Resume, checkpoint_files, pipeline_chunks

if TYPE_CHECKING:
    from pipeline.train import Trainer

log = logging.getLogger("famtron")


def check_inputs(cfg: config_lib.Config) -> None:
    """The manifests exist, hold samples of data.seq_len and a vocabulary that fits the model's."""
    from pipeline.data import manifest_info

    named = [("train_manifest", cfg.data.train_manifest), ("valid_manifest", cfg.data.valid_manifest)]
    if cfg.data.train_blend:
        named = [(f"train_blend[{i}]", path) for i, path in enumerate(cfg.data.train_blend)] + named[1:]
    for key, path in named:
        if not path:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"data.{key}={path}: no such file. Build shards first, e.g. python -m data_prep.shard "
                f"--input stdlib --tokenizer byte --seq-len {cfg.data.seq_len} --output data/stdlib-byte-{cfg.data.seq_len}"
            )
        info = manifest_info(path)
        if info["seq_len"] != cfg.data.seq_len:  # else the loader finds out after the model is built
            raise ValueError(f"data.{key}={path} was sharded with seq_len={info['seq_len']} but data.seq_len="
                             f"{cfg.data.seq_len}; set data.seq_len={info['seq_len']}, or re-shard with --seq-len "
                             f"{cfg.data.seq_len}")
        vocab = info["vocab_size"]
        if vocab > cfg.model.vocab_size:  # token ids past the embedding fail deep inside megatron otherwise
            raise ValueError(f"data.{key}={path} holds token ids up to {vocab - 1} but model.vocab_size="
                             f"{cfg.model.vocab_size}; set model.vocab_size >= {vocab}")


def save(tr: Trainer, tracker: Tracker) -> Path:
    """Shards (global layer names under PP), loaders, RNG, trainer state; with ZeRO, DeepSpeed's
    files go into the same step folder (`zero/`, pipeline/zero_checkpoint.py), under one manifest.
    Buffered metrics go to MLflow first: a crash after this save resumes from it, and steps up
    to it that were still in the buffer would never be logged again."""
    tracker.flush()
    trainer = {"step": tr.step, "mlflow_run_id": tracker.run_id, "pipeline_chunks": pipeline_chunks(tr.cfg),
               "eval": None if tr.evaluator is None else tr.evaluator.state_dict()}
    files = checkpoint_files(tr.ranks, tr.model, tr.optimizer, tr.loader, tr.rsp_state, trainer,
                             config_lib.to_yaml(tr.cfg), stages=tr.stages, zero_stage=tr.cfg.parallel.zero_stage)
    write_extra = None  # ZeRO: DeepSpeed's files, written into the step folder before its manifest
    if tr.engine is not None:
        from pipeline.zero_checkpoint import save_zero_checkpoint

        write_extra = functools.partial(save_zero_checkpoint, tr.engine, tag="zero", step=tr.step)
    path = save_checkpoint(tr.cfg.checkpoint.dir, tr.step, files, tr.cfg.checkpoint.keep_last, tr.ranks.rank,
                           write_extra=write_extra)
    log.info("checkpoint %s", path)
    return path


def start_tracking(tr: Trainer, run_id: str | None) -> Tracker:
    """MLflow run (rank 0), resolved config saved beside it, the run's headline on the console."""
    tracker = Tracker(tr.cfg.tracking, active=tr.ranks.is_rank0)
    if tr.ranks.is_rank0:
        r, d = tr.ranks, tr.cfg.data
        config_path = config_lib.save_config(tr.cfg, Path(tr.cfg.train.run_dir) / "config.yaml")
        tags = build_tags({"world_size": r.world_size, "tp_size": r.tp_size, "pp_size": r.pp_size, "dp_size": r.dp_size,
                           "device": tr.device.type, "resumed_from_step": tr.step})
        tracker.start(config_lib.to_flat_dict(tr.cfg), tags, resume_run_id=run_id)
        tracker.log_artifact(config_path)
        log.info("%s", tracker.describe())
        log.info("model: %s | %.2fM params | world %d = TP %d x PP %d x DP %d | micro %d x accum %d x DP = global %d"
                 " | %s %s",
                 describe(tr.cfg.model), tr.cfg.model.num_params(embeddings=True) / 1e6, r.world_size, r.tp_size,
                 r.pp_size, r.dp_size, d.micro_batch_size, tr.accum, d.global_batch_size, tr.device.type,
                 "bf16" if tr.use_bf16 else "fp32")
    return tracker


def report_finished(cfg: config_lib.Config, resume: Resume, ranks: Ranks) -> dict:
    """A rerun of a run that is already at train.steps: one line, and nothing written (run_dir,
    MLflow); returns the run's own summary. The status file tells slurm/train.sbatch not to requeue."""
    run_dir = Path(cfg.train.run_dir)
    if ranks.is_rank0:
        write_status("FINISHED")
        log.info("%s is finished (%s, step %d of train.steps=%d): nothing to train, nothing changed; raise "
                 "train.steps to train on, or give a new train.run_dir for another run", run_dir, resume.path,
                 resume.step, cfg.train.steps)
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    return {"status": "FINISHED", "step": resume.step, "steps": cfg.train.steps, "last_checkpoint": str(resume.path),
            "losses": [], "val_losses": [], "grad_norms": [], "run_dir": cfg.train.run_dir}


def finish_run(tracker: Tracker, summary: dict, run_dir: Path) -> None:
    """Summary JSON and loss curve into run_dir and MLflow; the closing console lines. Buffered
    metrics are sent first, so they survive a failure of anything after (also when the run raised)."""
    try:
        tracker.flush()
    except Exception as err:  # noqa: BLE001 - the summary and status must still be written
        log.warning("could not send the buffered metrics to MLflow: %s", err)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    history = {"loss": summary["losses"], "val_loss": summary["val_losses"]}
    if tracker.active:  # the whole run's curves, including the steps before a resume
        history = {key: tracker.full_history(key) for key in ("loss", "val_loss", "lr")}
    curve = build_loss_curve(history, run_dir / "loss_curve.png", title=f"{run_dir.name}: loss")
    for path in (run_dir / "summary.json", curve):
        if path is not None:
            tracker.log_artifact(path)
    tracker.finish(summary["status"])
    final, val = summary["final_loss"], summary["final_val_loss"]
    log.info("%s at step %d/%d | final loss %s | validation loss %s", summary["status"].lower(), summary["step"],
             summary["steps"], "n/a" if final is None else f"{final:.4f}", "n/a" if val is None else f"{val:.4f}")
    log.info("last checkpoint: %s", summary["last_checkpoint"])
    log.info("%s", tracker.describe())
