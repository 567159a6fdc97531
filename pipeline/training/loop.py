"""The training loop behind `python -m pipeline.train` (command line: pipeline/training/cli.py).

    summary = run(load_config("configs/demo.yaml", ["--train.steps=50"]))

Each step: this rank's micro-batches with the step's RPO offsets and RSP coin
(pipeline/training/draws.py), then the layout's step (pipeline/training/step.py: forward and
backward, gradient reduction and clipping, AdamW or DeepSpeed, the NaN/inf guard, the RSP state).
Around it: validation every train.eval_interval_steps (pipeline/training/validation.py), PassKey
and loss by position every eval.interval_steps (pipeline/evaluation/in_loop.py),
checkpoints every checkpoint.save_interval_steps and at the end (none with
checkpoint.enabled=false), MLflow from rank 0. SIGINT/SIGTERM/SIGUSR1 finish the current step,
write a checkpoint and exit; `checkpoint.resume=auto` continues from it, refusing before any work
a config that differs from the checkpoint's in keys not safe to change (pipeline/config/resume.py).
A rerun of a finished run trains nothing and writes nothing. The summary ends with the peak GPU
and host memory over all ranks (pipeline/parallel/collectives.py peak_memory).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from pipeline.checkpointing.resume import resolve_resume
from pipeline.config.tree import Config
from pipeline.evaluation.in_loop import InLoopEvaluator
from pipeline.parallel.collectives import peak_memory
from pipeline.parallel.groups import stop_groups
from pipeline.training.console import IntervalMeter, build_progress_bar, log_peak_memory
from pipeline.training.draws import draw_step, micro_batch_offsets
from pipeline.training.validation import evaluate
from pipeline.training.fault import StopRequest, write_status
from pipeline.training.flops import flops_per_token, peak_flops
from pipeline.training.optim import lr_at
from pipeline.training.run_files import finish_run, report_finished, restore, save, start_tracking
from pipeline.training.step import StepBatch, StepResult
from pipeline.training.tracking import Tracker
from pipeline.training.trainer import Trainer, build_trainer, start

log = logging.getLogger("famtron")


@dataclass
class Record:
    """What the run reports at the end (summary.json)."""

    history: dict = field(default_factory=lambda: {"losses": [], "val_losses": [], "grad_norms": []})
    rsp_steps: int = 0  # steps that started from the saved FAM
    last_checkpoint: Path | None = None
    save_seconds: float = 0.0  # the slowest save so far (the wall-time budget's margin)
    status: str = "FAILED"
    memory: dict = field(default_factory=lambda: dict.fromkeys(("peak_gpu_gib", "peak_host_gib", "peak_host_node_gib")))


def run(cfg: Config) -> dict:
    """Train as configured; returns the summary (also written to <run_dir>/summary.json).
    Process groups this call created are stopped on the way out, so a caller (a test, a
    notebook) can run again with other parallel sizes."""
    owns_groups = not dist.is_initialized()
    try:
        return _train(cfg)
    finally:
        if owns_groups:
            stop_groups()


def _train(cfg: Config) -> dict:
    groups = start(cfg)
    resume = resolve_resume(cfg, groups)  # config and checkpoint checks, before the model is built
    if resume is not None and resume.step >= cfg.train.steps:
        return report_finished(cfg, resume, groups)
    tr = build_trainer(cfg, groups)
    saved = restore(tr, resume) if resume is not None else {}
    tracker = start_tracking(tr, saved.get("mlflow_run_id"))
    tr.evaluator = InLoopEvaluator.build(tr, tracker, saved.get("eval"))
    record = Record(last_checkpoint=resume.path if resume is not None else None)
    try:
        train_loop(tr, tracker, record)
    finally:
        summary = summarize(tr, tracker, record)
    return summary


def train_step(tr: Trainer, data_iter) -> StepResult:
    """One optimizer step of the layout's step object, on the next micro-batches of `data_iter`."""
    batch = next_batch(tr, data_iter)
    lr = lr_at(tr.step, tr.cfg.optim, tr.cfg.train.steps)
    result = tr.strategy.run(batch, lr, tr.nonfinite, tr.step + 1)
    tr.step += 1
    tr.keys.step_done(tr.step)
    return result


def next_batch(tr: Trainer, data_iter) -> StepBatch:
    """This rank's accum micro-batches of the step, with their RPO offsets and the RSP coin."""
    cfg, d, device = tr.cfg, tr.cfg.data, tr.groups.device
    draws = draw_step(cfg.train.seed, tr.step, d.global_batch_size, cfg.model.rope_base, cfg.train.rpo,
                      cfg.train.rsp_probability)
    tokens, offsets = [], []
    for a in range(tr.strategy.accum):
        batch = next(data_iter)
        tr.keys.add(batch["keys"])
        tokens.append(batch["tokens"].to(device, non_blocking=True))  # [b, s + 1]
        offsets.append(micro_batch_offsets(draws, a, tr.groups, d.micro_batch_size).to(device))  # [b]
    return StepBatch(tokens, offsets, draws.use_saved_fam)


def train_loop(tr: Trainer, tracker: Tracker, record: Record) -> None:
    """Steps until train.steps (or train.exit_after_steps in this process, a stop signal, the
    wall-time budget); each followed by its log line, validation and checkpoint when due."""
    t = tr.cfg.train
    meter = IntervalMeter(tr.cfg.data.global_batch_size * tr.cfg.data.seq_len,
                          flops_per_token(tr.cfg.model, tr.cfg.data.seq_len), peak_flops(tr.groups.device, t.peak_tflops),
                          tr.groups.world_size, t.steps)
    last_step = min(t.steps, tr.step + t.exit_after_steps) if t.exit_after_steps else t.steps
    bar = build_progress_bar(tr.groups.is_rank0 and t.progress_bar, t.steps, tr.step)
    data_iter = iter(tr.loader)
    try:
        if tr.evaluator.catch_up() and tr.cfg.checkpoint.enabled:  # an evaluation the stopped run owed, recorded
            record.last_checkpoint = save(tr, tracker)
        with StopRequest(t.max_wall_seconds) as stop:
            while tr.step < last_step:
                started = time.perf_counter()
                result = train_step(tr, data_iter)
                step_seconds = time.perf_counter() - started
                if not result.skipped:  # a skipped step's NaN stays out of the interval means
                    meter.add(result.loss, step_seconds)
                record.rsp_steps += result.used_saved_fam and not result.skipped
                stop.check_budget(step_seconds, record.save_seconds)
                stopping = stop.agreed(tr.groups.device)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.loss:.3f}")
                after_step(tr, tracker, record, meter, result, tr.step == last_step, stopping)
                if stopping:
                    break
        record.status = "FINISHED" if tr.step == t.steps else "KILLED"  # KILLED: stopped early, resumable
        record.memory = peak_memory(tr.groups.device)
        log_peak_memory(record.memory)
    finally:
        if bar is not None:
            bar.close()


def after_step(tr: Trainer, tracker: Tracker, record: Record, meter: IntervalMeter, result: StepResult,
               last: bool, stopping: bool) -> None:
    """The log line (every train.log_interval_steps), validation, the in-loop evaluation and the
    checkpoint when due; the last step of this process (`last`, or `stopping` early) always logs and
    saves, and so does a step that evaluated (its evaluator state and weights are saved together)."""
    t, step, history = tr.cfg.train, tr.step, record.history
    ending = last or stopping
    if (step % t.log_interval_steps == 0 or ending) and meter.steps:
        metrics = meter.report(step, result.lr, result.grad_norm)
        if hasattr(tr.loader, "realised_proportions"):  # a blend: the mix actually drawn
            mix = tr.loader.realised_proportions()
            metrics.update({f"blend_{i}": share for i, share in enumerate(mix.values())})
            log.info("blend so far: %s", ", ".join(f"{p} {share:.3f}" for p, share in mix.items()))
        history["losses"].append((step, metrics["loss"]))
        history["grad_norms"].append((step, result.grad_norm))
        tracker.log_metrics(step, metrics)
    if tr.valid_loader is not None and (step == t.steps or (t.eval_interval_steps and step % t.eval_interval_steps == 0)):
        val = evaluate(tr)
        history["val_losses"].append((step, val))
        log.info("step %d | validation loss %.4f", step, val)
        tracker.log_metrics(step, {"val_loss": val})
    evaluated = tr.evaluator.maybe_run(step, stopping)  # pipeline/evaluation/in_loop.py
    tracker.maybe_flush(step)
    interval = tr.cfg.checkpoint.save_interval_steps
    if ((interval and step % interval == 0) or ending or evaluated) and tr.cfg.checkpoint.enabled:
        save_started = time.perf_counter()
        record.last_checkpoint = save(tr, tracker)
        record.save_seconds = max(record.save_seconds, time.perf_counter() - save_started)


def summarize(tr: Trainer, tracker: Tracker, record: Record) -> dict:
    """The run's summary; on rank 0 also the status file (slurm/train.sbatch), summary.json, the
    loss curve and the MLflow run's end."""
    t, history = tr.cfg.train, record.history
    losses, vals = history["losses"], history["val_losses"]
    summary = {
        "status": record.status, "step": tr.step, "steps": t.steps, "first_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None, "final_val_loss": vals[-1][1] if vals else None,
        **history, "rsp_steps": record.rsp_steps, "skipped_steps": tr.nonfinite.skipped,
        "last_checkpoint": str(record.last_checkpoint), **record.memory,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tr.cfg.tracking.tracking_uri, "run_dir": t.run_dir,
    }
    if tr.groups.is_rank0:
        write_status(record.status)  # for slurm/train.sbatch: KILLED means requeue and resume
        finish_run(tracker, summary, Path(t.run_dir))
    return summary
