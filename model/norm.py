"""RMSNorm: NVIDIA apex's fused kernel when importable, torch's otherwise."""

from __future__ import annotations

import functools

import torch

try:  # apex is optional and not on PyPI (the PyPI "apex" is unrelated)
    from apex.normalization import FusedRMSNorm as _ApexRMSNorm
except ImportError:  # pragma: no cover - depends on the machine
    _ApexRMSNorm = None


def build_norm(config, tp_group) -> torch.nn.Module:
    if _ApexRMSNorm is not None and torch.cuda.is_available():
        norm = _ApexRMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    else:
        norm = torch.nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    # Under sequence parallelism each TP rank sees a slice of the tokens (and FAM rows), so this
    # weight's gradient is partial: summed over `tp_group` in backward, whatever runs the step
    # (plain loop, pipeline schedule, DeepSpeed). Megatron's mark is kept for tools that look for it.
    norm.weight.sequence_parallel = config.sequence_parallel
    if config.sequence_parallel:
        norm.weight.register_hook(functools.partial(_sum_over_tensor_parallel_ranks, group=tp_group))
    return norm


def _sum_over_tensor_parallel_ranks(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=group)
    return grad
