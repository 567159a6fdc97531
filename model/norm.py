"""RMSNorm: NVIDIA apex's fused kernel when importable, torch's otherwise."""

from __future__ import annotations

import torch

try:  # apex is optional and not on PyPI (the PyPI "apex" is unrelated)
    from apex.normalization import FusedRMSNorm as _ApexRMSNorm
except ImportError:  # pragma: no cover - depends on the machine
    _ApexRMSNorm = None


def build_norm(config) -> torch.nn.Module:
    if _ApexRMSNorm is not None and torch.cuda.is_available():
        norm = _ApexRMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    else:
        norm = torch.nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    # Under sequence parallelism each TP rank sees a slice of the tokens, so this weight's
    # gradient is partial: megatron's convention marks it for an all-reduce over TP.
    norm.weight.sequence_parallel = config.sequence_parallel
    return norm
