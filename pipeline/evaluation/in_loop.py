"""Evaluation inside the training loop (issue 15 item 4): PassKey and loss by position every
eval.interval_steps and at the end, logged to MLflow, surviving resume.

    evaluator = InLoopEvaluator.build(tr, tracker, saved_state)   # pipeline/training/loop.py, after tracking starts
    evaluator.catch_up()                   # a resumed run first runs an evaluation its checkpoint still owes
    evaluated = evaluator.maybe_run(step, stopping)   # after each step; True: the loop checkpoints now
    trainer_state["eval"] = evaluator.state_dict()    # in every checkpoint

When: at every step that is a multiple of eval.interval_steps and at train.steps. A step where the
run stops early (a signal, train.max_wall_seconds) skips its evaluation unless eval.at_stop, so
the stop stays fast; the checkpoint written there records that the evaluation is still owed and the
resumed run runs it first (`catch_up`), on the same weights. The loop checkpoints at every step
that evaluated, so the state "evaluated through step s" and the weights of step s are saved
together: a resume neither repeats an evaluation nor loses one. (A crash between an evaluation and
the end of its checkpoint's save resumes from the checkpoint before; the evaluation then runs again
on recomputed weights, and MLflow keeps the first values of its metrics: pipeline/training/tracking.py.)

What: rank 0 writes `<run_dir>/eval/step_XXXXXXXX/` (passkey.json, passkey_heatmap.png,
position_loss.json, position_loss.png), logs the metrics (pipeline/evaluation/reports.py names)
at the step and the four files as MLflow artifacts under `eval/step_XXXXXXXX/`. Under data
parallelism every rank evaluates a share (PassKey cells, held-out sequences) and rank 0 gathers;
TP/PP/ZeRO-3 are refused by pipeline/config/rules.py check_eval. The weights are evaluated in fp32 as stored, whatever
the training's autocast (the numbers do not depend on the step's dtype, and the decode path of
model/generation is checked in fp32), with no RNG draws: evaluating does not change the training
that follows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pipeline.evaluation.codec import load_codec
from pipeline.evaluation.passkey_eval import run_passkey
from pipeline.evaluation.position_loss import bucket_edges, held_out_sequences, run_position_loss
from pipeline.evaluation.reports import passkey_metrics, position_loss_metrics, write_passkey, write_position_loss
from pipeline.evaluation.settings import passkey_settings

log = logging.getLogger("famtron")


class InLoopEvaluator:
    def __init__(self, tr, tracker, state: dict | None = None):
        self.tr, self.tracker = tr, tracker
        self.cfg = tr.cfg.eval
        self.enabled = self.cfg.enabled
        self.last_step = -1  # the newest step evaluated (and checkpointed with this state)
        if state:
            self.load_state_dict(state)
        self.codec = self.sequences = self.edges = None
        if self.enabled:
            self._prepare()

    @classmethod
    def build(cls, tr, tracker, state: dict | None = None) -> "InLoopEvaluator":
        return cls(tr, tracker, state)

    # ------------------------------------------------------------ when

    def due(self, step: int) -> bool:
        interval, total = self.cfg.interval_steps, self.tr.cfg.train.steps
        return step == total or (interval > 0 and step % interval == 0)

    def maybe_run(self, step: int, stopping: bool = False) -> bool:
        """Evaluate at `step` if it is due (or the run stops here and eval.at_stop); returns
        whether it evaluated, so the loop checkpoints this step."""
        if not self.enabled or step <= self.last_step:
            return False
        final = step == self.tr.cfg.train.steps
        if stopping and not (final or self.cfg.at_stop):
            return False  # owed: the resumed run's catch_up evaluates these weights
        if not (self.due(step) or (stopping and self.cfg.at_stop)):
            return False
        self.run(step)
        return True

    def catch_up(self) -> bool:
        """At a resume: the evaluation of the checkpoint's step, if it was due and skipped."""
        step = self.tr.step
        if not self.enabled or step == 0 or step <= self.last_step or not self.due(step):
            return False
        log.info("step %d | running the evaluation this checkpoint's run skipped when it stopped", step)
        self.run(step)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])

    # ------------------------------------------------------------ what

    def _prepare(self) -> None:
        """Tokenizer, bucket edges and held-out sequences, read once; bad input fails here,
        before the first training step."""
        cfg, tr = self.cfg, self.tr
        if cfg.passkey_lengths:
            self.codec = load_codec(cfg.tokenizer or _training_tokenizer(tr.cfg))
            from pipeline.evaluation.passkey import PassKeyText
            from pipeline.evaluation.passkey_eval import check_settings

            check_settings(PassKeyText(self.codec), passkey_settings(cfg), tr.cfg.model.block_size)
        if cfg.position_loss_manifest:
            self.edges = bucket_edges(cfg.position_loss_length, cfg.position_loss_buckets)
            self.sequences = held_out_sequences(cfg.position_loss_manifest, cfg.position_loss_length,
                                                cfg.position_loss_sequences, vocab_size=tr.cfg.model.vocab_size)

    def run(self, step: int) -> None:
        tr, ranks = self.tr, self.tr.groups
        passkey = position = None
        if self.codec is not None:
            settings = passkey_settings(self.cfg)
            mine = settings.grid()[ranks.dp_rank :: ranks.dp_size]
            parts = _gather(run_passkey(tr.strategy.model, self.codec, settings, cells=mine)["cells"], ranks.dp_group)
            passkey = {"tokenizer": self.codec.spec, "trials": settings.trials, "seed": settings.seed,
                       "lengths": settings.lengths, "depths": settings.depths, "step": step,
                       "training_length": tr.cfg.data.seq_len, "cells": _in_grid_order(parts, settings.grid())}
        if self.sequences is not None:
            mine = self.sequences[ranks.dp_rank :: ranks.dp_size]
            result = None if len(mine) == 0 else run_position_loss(
                tr.strategy.model, mine, self.edges, self.cfg.chunk_tokens, batch_size=len(mine))
            position = _merge_position_losses([r for r in _gather([result], ranks.dp_group) if r is not None])
            position.update(step=step, training_length=tr.cfg.data.seq_len)
        if ranks.is_rank0:
            self._report(step, passkey, position)
        self.last_step = step

    def _report(self, step: int, passkey: dict | None, position: dict | None) -> None:
        folder = Path(self.tr.cfg.train.run_dir) / "eval" / f"step_{step:08d}"
        title = f"{Path(self.tr.cfg.train.run_dir).name} step {step}"
        files, metrics = [], {}
        if passkey is not None:
            files += write_passkey(passkey, folder, f"{title}: PassKey accuracy")
            metrics.update(passkey_metrics(passkey))
            per_length = ", ".join(f"{n}: {metrics[f'passkey/acc_L{n}']:.2f}" for n in passkey["lengths"])
            log.info("step %d | passkey accuracy %.3f (by length %s)", step, metrics["passkey/acc"], per_length)
        if position is not None:
            files += write_position_loss(position, folder, Path(self.tr.cfg.train.run_dir).name,
                                         f"{title}: loss by position", self.tr.cfg.data.seq_len)
            metrics.update(position_loss_metrics(position))
            ends = position["buckets"][0]["loss"], position["buckets"][-1]["loss"]
            log.info("step %d | loss by position: %.3f at the start, %.3f in the last bucket", step, *ends)
        self.tracker.log_metrics(step, metrics)
        _log_artifacts(self.tracker, files, f"eval/{folder.name}")


def _training_tokenizer(cfg) -> str:
    from pipeline.data.loader import manifest_info

    manifest = cfg.data.train_blend[0] if cfg.data.train_blend else cfg.data.train_manifest
    return manifest_info(manifest)["tokenizer"]


def _gather(items: list, group) -> list:
    """Every DP rank's list, concatenated in rank order (the list itself without a group)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(items)
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, items, group=group)
    return [item for part in out for item in part]


def _in_grid_order(cells: list[dict], grid: list[tuple[int, float]]) -> list[dict]:
    by_cell = {(c["length"], c["depth"]): c for c in cells}
    return [by_cell[cell] for cell in grid]


def _merge_position_losses(results: list[dict]) -> dict:
    """One result from the ranks' shares: bucket means weighted by each share's sequence count."""
    total = sum(r["sequences"] for r in results)
    merged = dict(results[0], sequences=total)
    merged["buckets"] = [dict(b, loss=sum(r["buckets"][i]["loss"] * r["sequences"] for r in results) / total)
                         for i, b in enumerate(results[0]["buckets"])]
    return merged


def _log_artifacts(tracker, files: list[Path], artifact_path: str) -> None:
    """The evaluation's files into the run's artifacts under `artifact_path` (rank 0, tracking on)."""
    if not tracker.active or tracker.run_id is None or not files:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracker.cfg.tracking_uri)
    for path in files:
        client.log_artifact(tracker.run_id, str(path), artifact_path=artifact_path)
