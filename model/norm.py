"""RMSNorm: NVIDIA apex's fused kernel when importable, torch's otherwise."""

from __future__ import annotations

import torch

try:  # apex is optional and not on PyPI (the PyPI "apex" is unrelated)
    from apex.normalization import FusedRMSNorm as _ApexRMSNorm
except ImportError:  # pragma: no cover - depends on the machine
    _ApexRMSNorm = None


def build_norm(config) -> torch.nn.Module:
    if _ApexRMSNorm is not None and torch.cuda.is_available():
        return _ApexRMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return torch.nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
