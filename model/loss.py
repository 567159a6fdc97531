"""Cross-entropy of vocabulary-parallel logits over an explicit tensor-parallel group.

megatron-core 0.16.1's `vocab_parallel_cross_entropy` all-reduces over its global TP group; the
model passes its own group instead (model/groups.py), so this autograd function runs megatron's
own arithmetic (`VocabParallelCrossEntropy`'s static steps, in megatron's order) with the three
all-reduces on `group`. On one rank the all-reduces are skipped: they would return their input.

Shapes: logits [s, b, V/tp] (this rank's vocabulary rows), target [s, b] -> loss [s, b].
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as _Steps


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if group.size() > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        logits, logits_max = _Steps.calculate_logits_max(logits)
        _all_reduce(logits_max, dist.ReduceOp.MAX, group)
        rows = logits.size(-1)  # this rank's vocabulary shard: ids [rank * rows, (rank + 1) * rows)
        start = group.rank() * rows
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = _Steps.calculate_predicted_logits(
            logits, target, logits_max, start, start + rows)
        _all_reduce(predicted, dist.ReduceOp.SUM, group)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        softmax, loss = _Steps.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = _Steps.prepare_gradient_calculation_operands(softmax, target_mask)
        grad_input = _Steps.calculate_gradients(grad_2d, arange_1d, masked_target_1d, update, grad_input, grad_output)
        return grad_input, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group) -> torch.Tensor:
    """Per-token loss [s, b] of logits [s, b, V/tp] split over `group`'s ranks, target [s, b]."""
    return _CrossEntropy.apply(logits, target, group)
