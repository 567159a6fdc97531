"""What a training run writes and reads around the loop (pipeline/training/loop.py): checkpoints
(the step's own files and the run's, pipeline/checkpointing/), the MLflow run with the resolved
config, and at the end the summary JSON and loss curve. `tr` is pipeline/training/trainer.py's Trainer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from model.config import describe
from pipeline.checkpointing.files import load_file, save_checkpoint
from pipeline.checkpointing.resume import Resume
from pipeline.checkpointing.shards import load_run_files, run_files
from pipeline.config.load import save_config, to_flat_dict, to_yaml
from pipeline.config.tree import Config
from pipeline.parallel.groups import ProcessGroups
from pipeline.training.fault import write_status
from pipeline.training.tracking import Tracker, build_loss_curve, build_tags
from pipeline.training.trainer import Trainer

log = logging.getLogger("famtron")


def save(tr: Trainer, tracker: Tracker) -> Path:
    """The step's model and optimizer files (with ZeRO, DeepSpeed's `zero/` folder too) and the
    run's (loaders, RNG, trainer state, config), under one manifest. Buffered metrics go to MLflow
    first: a crash after this save resumes from it, and steps up to it that were still in the
    buffer would never be logged again."""
    tracker.flush()
    trainer = {"step": tr.step, "mlflow_run_id": tracker.run_id, "pipeline_chunks": tr.strategy.chunks,
               "eval": None if tr.evaluator is None else tr.evaluator.state_dict()}
    files = {**run_files(tr.groups, tr.loader, trainer, to_yaml(tr.cfg)), **tr.strategy.checkpoint_files()}
    path = save_checkpoint(tr.cfg.checkpoint.dir, tr.step, files, tr.cfg.checkpoint.keep_last, tr.groups.rank,
                           write_extra=tr.strategy.write_extra(tr.step))
    log.info("checkpoint %s", path)
    return path


def restore(tr: Trainer, resume: Resume) -> dict:
    """This rank's part of the checkpoint: the step's files, the loader, and (same layout) the RNG;
    returns the saved trainer state (its MLflow run id to continue, the evaluator's state)."""
    trainer = load_file(resume.path, "trainer.pt")
    exact = tr.strategy.restore(resume.path, trainer)
    load_run_files(resume.path, tr.groups, tr.loader, rng=exact)
    tr.step = trainer["step"]
    log.info("resumed from %s (step %d)", resume.path, tr.step)
    return trainer


def start_tracking(tr: Trainer, run_id: str | None) -> Tracker:
    """MLflow run (rank 0), resolved config saved beside it, the run's headline on the console."""
    tracker = Tracker(tr.cfg.tracking, active=tr.groups.is_rank0)
    if tr.groups.is_rank0:
        r, d, device = tr.groups, tr.cfg.data, tr.groups.device
        config_path = save_config(tr.cfg, Path(tr.cfg.train.run_dir) / "config.yaml")
        tags = build_tags({"world_size": r.world_size, "tp_size": r.tp_size, "pp_size": r.pp_size, "dp_size": r.dp_size,
                           "device": device.type, "resumed_from_step": tr.step})
        tracker.start(to_flat_dict(tr.cfg), tags, resume_run_id=run_id)
        tracker.log_artifact(config_path)
        log.info("%s", tracker.describe())
        log.info("model: %s | %.2fM params | world %d = TP %d x PP %d x DP %d | micro %d x accum %d x DP = global %d"
                 " | %s %s",
                 describe(tr.cfg.model), tr.cfg.model.num_params(embeddings=True) / 1e6, r.world_size, r.tp_size,
                 r.pp_size, r.dp_size, d.micro_batch_size, tr.strategy.accum, d.global_batch_size, device.type,
                 tr.strategy.precision)
    return tracker


def report_finished(cfg: Config, resume: Resume, groups: ProcessGroups) -> dict:
    """A rerun of a run that is already at train.steps: one line, and nothing written (run_dir,
    MLflow); returns the run's own summary. The status file tells slurm/train.sbatch not to requeue."""
    run_dir = Path(cfg.train.run_dir)
    if groups.is_rank0:
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
