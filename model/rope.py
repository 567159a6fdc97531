"""Rotary position embedding (RoPE), device-agnostic.

megatron-core 0.16.1's RotaryEmbedding is CUDA-only, and FAM needs positions that are not a
plain arange: a per-example random offset (RPO, docs/fam.md "RPO and RSP") and FAM rows whose queries
and keys sit at different positions (§1.5). So positions are an explicit float tensor.
Convention: rotate-half (GPT-NeoX / Llama), base 10000 by default.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] for float positions of any shape."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [..., d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., d]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., d] by angles broadcastable to it; computed in fp32, returned in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def rope_sbnd(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE for megatron's layout: x [s, b, n, d], positions [b, s] -> [s, b, n, d]."""
    cos, sin = rope_angles(positions.transpose(0, 1), x.shape[-1], base)  # [s, b, d]
    return apply_rope(x, cos[:, :, None, :], sin[:, :, None, :])
