"""One training step, whatever the layout: the part every layout shares, and the hooks each fills.

    result = strategy.run(batch, lr, guard, step)      # StepBatch in, StepResult out

`TrainStep.run` is the step every layout takes: the layout's forward and backward over the step's
micro-batches with its gradient reduction and clipping (`forward_backward`), the loss averaged
over data parallelism, the non-finite guard's decision on values equal on every rank
(pipeline/training/fault.py), the layout's optimizer update or discard (`update`), and the RSP
state kept for the next step (docs/fam.md, "RPO and RSP"). The four layouts (pipeline/training/
plain_step.py: Plain, Pipeline; zero_step.py: Zero, ZeroPipeline) each own their model, optimizer,
state dict, checkpoint files and restore; pipeline/training/trainer.py `build_step` picks one.

A long sample can be split along the sequence (train.micro_chunk_len, issue 14): `PlainStep.micro_batch`
runs it through model/micro_chunks.py (exact or truncated), the pipeline layouts make its micro-chunks the
schedule's micro-batches (truncated only; pipeline/parallel/stages.py). Evaluation goes through
`eval_losses`. Precision (train.precision: fp32, bf16-autocast, bf16-mixed) is `autocast` here and,
for bf16-mixed, the optimizer with fp32 master weights (pipeline/training/precision.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from model import FAMState
from pipeline.config.rules import layer_counts
from pipeline.config.tree import Config
from pipeline.parallel.collectives import all_reduce_mean
from pipeline.parallel.groups import ProcessGroups
from pipeline.training.draws import share_rsp_state
from pipeline.training.fault import NonFiniteGuard
from pipeline.training.precision import resolve_precision


@dataclass
class StepBatch:
    """This rank's micro-batches of one step: tokens [b, s + 1] each, RPO offsets [b] each."""

    tokens: list[torch.Tensor]
    offsets: list[torch.Tensor]
    use_saved_fam: bool  # the step's RSP coin


@dataclass
class StepResult:
    loss: float  # mean over the step's micro-batches and the data-parallel ranks
    grad_norm: float  # global, before clipping
    lr: float
    used_saved_fam: bool  # started from the RSP state
    skipped: bool  # non-finite: no update


def uses_bf16(precision: str, device: torch.device) -> bool:
    """train.precision asks for bf16 GEMMs: bf16-autocast, bf16-mixed, or auto on a GPU (fp32 on CPU)."""
    return resolve_precision(precision, device) != "fp32"


class TrainStep:
    """A layout's training step (see the module docstring). `model` is what evaluation and
    state dicts see: the whole model, or this rank's pipeline stages as a ModuleList."""

    def __init__(self, cfg: Config, groups: ProcessGroups, model: torch.nn.Module, optimizer, accum: int):
        self.cfg, self.groups, self.model, self.optimizer, self.accum = cfg, groups, model, optimizer, accum
        self.precision = resolve_precision(cfg.train.precision, groups.device)
        self.use_bf16 = self.precision != "fp32"
        self.params = [p for p in model.parameters() if p.requires_grad]
        # What gradient averaging and clipping work on: the parameters, or bf16-mixed's fp32 masters.
        self.grad_params = getattr(optimizer, "masters", self.params)
        self.uses_fam = cfg.model.uses_fam
        self.rsp_state: FAMState | None = None  # the FAM saved by the previous step
        # Long samples in micro-chunks (model/micro_chunks.py; docs/fam.md "Micro-chunks"): 0 = off.
        self.micro_chunk_len = cfg.train.micro_chunk_len or 0
        self.truncated = cfg.train.micro_chunk_mode == "truncated"
        self.offload_states = cfg.train.micro_chunk_offload_states
        p = cfg.parallel
        self.chunks = layer_counts(cfg.model.num_layers, p.pipeline_parallel_size * p.virtual_stages, p.pipeline_layout)

    def autocast(self):
        return torch.autocast(self.groups.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def run(self, batch: StepBatch, lr: float, guard: NonFiniteGuard, step: int) -> StepResult:
        """Optimizer step number `step` (1-based). A NaN/inf step consumes its batches but
        updates nothing; the guard raises after too many in a row."""
        start = self.rsp_state if self.uses_fam and batch.use_saved_fam else None
        local_loss, grad_norm, next_rsp = self.forward_backward(batch, start, lr)
        loss = float(all_reduce_mean(local_loss, self.groups.dp_group))
        # Loss and norm are the same on every rank, so every rank skips (or raises) together.
        skipped = guard.should_skip(step, loss, grad_norm)
        self.update(lr, skipped)
        if not skipped and self.uses_fam:
            self.rsp_state = share_rsp_state(next_rsp, self.groups)
        return StepResult(loss, grad_norm, lr, start is not None, skipped)

    # ------------------------------------------------------------ what each layout fills in

    def forward_backward(self, batch: StepBatch, start: FAMState | None, lr: float):
        """Gradients of the step, reduced and clipped: (this rank's mean loss, global grad norm,
        the RSP state to keep: the FAM of the first sample of the first micro-batch)."""
        raise NotImplementedError

    def update(self, lr: float, skipped: bool) -> None:
        """Apply the step (unless skipped) and clear the gradients."""
        raise NotImplementedError

    def eval_losses(self, tokens: list[torch.Tensor]) -> list:
        """Forward only, no RPO or RSP: the losses of the micro-batches `tokens` this rank computes."""
        raise NotImplementedError

    def checkpoint_files(self) -> dict[str, Any]:
        """This rank's model (with the RSP state) and optimizer files (pipeline/checkpointing/shards.py)."""
        raise NotImplementedError

    def write_extra(self, step: int) -> Callable | None:
        """Files written into the step folder besides `checkpoint_files` (DeepSpeed's), or None."""
        return None

    def restore(self, path: Path, trainer: dict) -> bool:
        """Load this rank's part of checkpoint `path`; False if it was resharded (weights only)."""
        raise NotImplementedError


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """model.eval() and no gradients inside; model.train() after."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()
