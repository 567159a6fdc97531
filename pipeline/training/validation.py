"""Validation loss during training: every train.eval_interval_steps and at the end, no RPO or RSP.

eval_steps counts global batches, so each rank takes eval_steps x accum micro-batches and DP=2
evaluates the same samples as DP=1; the layout's step computes the losses (`eval_losses`: the
whole model, or the pipeline schedule's forward-only pass with the losses on the last stage).
"""

from __future__ import annotations

import itertools

import torch

from pipeline.parallel.collectives import all_reduce_sum
from pipeline.training.step import evaluating
from pipeline.training.trainer import Trainer


def evaluate(tr: Trainer) -> float:
    """Mean validation loss over the micro-batches of train.eval_steps global batches."""
    strategy, groups = tr.strategy, tr.groups
    total = torch.zeros(2, dtype=torch.float64, device=groups.device)  # [loss sum, micro-batches]
    batches = iter(tr.valid_loader)
    with evaluating(strategy.model):
        for _ in range(tr.cfg.train.eval_steps):
            tokens = [b["tokens"].to(groups.device) for b in itertools.islice(batches, strategy.accum)]
            if len(tokens) < strategy.accum:
                break
            with strategy.autocast():
                losses = strategy.eval_losses(tokens)
            total += torch.tensor([sum(float(x) for x in losses), len(losses)], dtype=torch.float64, device=groups.device)
    total = all_reduce_sum(all_reduce_sum(total, groups.pp_group), groups.dp_group)
    return float(total[0] / total[1])
