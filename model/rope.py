"""Rotary position embedding (RoPE), device-agnostic.

megatron-core 0.16.1's RotaryEmbedding is CUDA-only, and FAM needs positions that are not a
plain arange: a per-example random offset (RPO, docs/fam.md "RPO and RSP") and FAM rows whose queries
and keys sit at different positions (§1.5). So positions are an explicit float tensor.
Convention: rotate-half (GPT-NeoX / Llama), base 10000 by default.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from model.compile_limits import bounded_compiles, compiled_pointwise

# The QKV split and RoPE as one compiled kernel (and one for its backward) on CUDA: issue 13's
# profile of bswa-1b at 8k found RoPE's eager ops (fp32 upcast, cat, two products, the add, the
# cast back, and in backward the slices' zero-filled gradients) among the largest launches left
# beside the GEMMs: 144 products, 127 cats and 180 copies of [8192, 1, 12, 128] per step, ~15 ms
# of 186 (benchmarks/results/2026-11-30-2xH200). On by default since it ran on an H200 with
# model/mlp.py's SwiGLU (figures there); `benchmarks.train_step --eager-ops` turns both off.
FUSED = True


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] for float positions of any shape."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [..., d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., d]
    return angles.cos().float(), angles.sin().float()


class SharedTables:
    """RoPE tables computed once per forward and handed to every layer, as megatron's GPTModel
    computes its rotary embedding once per forward for all its layers. The layers keep their
    signature (hidden, positions, state): inside `scope()` (model/language_model.py run_layers,
    around one forward of its layers) `get` computes a table once per positions tensor and key and
    returns the same tensors to every later caller. Outside a scope (a layer called alone, a layer
    recompute in backward, generation's steps) it computes them each time. A scope, not a cache
    that outlives the forward: a pipeline stage receives its positions into the same buffer for
    every micro-batch, and that write does not bump the tensor's version.
    Measured on one H200 (fam-1b, 8k tokens, micro-batch 4, 2026-12-02, "Session 22"): per layer,
    the block tokens' q and k tables and the FAM rows' four took ~75 small launches, in a forward
    whose GPU waited on the CPU; and autograd saved each layer's own copy (67 MB a layer there)."""

    def __init__(self):
        self.entries: dict | None = None  # id(positions) -> (positions, version, {key: tables}) in a scope

    @contextlib.contextmanager
    def scope(self):
        outer, self.entries = self.entries, {}
        try:
            yield
        finally:
            self.entries = outer

    def get(self, positions: torch.Tensor, key: tuple, compute: Callable[[], tuple]) -> tuple:
        if self.entries is None or positions.is_inference():  # (an inference tensor has no version)
            return compute()
        entry = self.entries.get(id(positions))
        if entry is None or entry[1] != positions._version:  # the entry holds positions: its id stays its own
            entry = self.entries[id(positions)] = (positions, positions._version, {})
        if key not in entry[2]:
            entry[2][key] = compute()
        return entry[2][key]


SHARED = SharedTables()


def token_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [s, b, 1, d] of positions [b, s], shared by every layer (`SharedTables`)."""
    def compute():
        cos, sin = rope_angles(positions.transpose(0, 1), head_dim, base)  # [s, b, d]
        return cos[:, :, None], sin[:, :, None]

    return SHARED.get(positions, ("tokens", head_dim, base), compute)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., d] by angles broadcastable to it; computed in fp32, returned in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def split_qkv_rope(mixed: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor, base: float):
    """megatron's grouped QKV output [s, b, g, npg + 2, d] -> q [s, b, g * npg, d] and k [s, b, g, d]
    with RoPE at positions [b, s] (tables shared by the layers: `token_tables`), and v [s, b, g, d].
    On CUDA (FUSED) one compiled kernel reads `mixed` once and writes all three (its backward writes
    the whole gradient of `mixed` in one kernel); elsewhere the same math in eager ops, v a view of
    `mixed`."""
    q_tables = token_tables(q_positions, mixed.shape[-1], base)
    k_tables = q_tables if k_positions is q_positions else token_tables(k_positions, mixed.shape[-1], base)
    tables = q_tables + k_tables
    if not (FUSED and mixed.is_cuda):
        return _split_rope(mixed, *tables)
    with bounded_compiles("the QKV split and RoPE (model/rope.py)"):
        return _compiled_split_rope()(mixed, *tables, True)


def _split_rope(mixed, cos_q, sin_q, cos_k, sin_k, own_v: bool = False):
    s, b, g, rows, d = mixed.shape
    q = apply_rope(mixed[:, :, :, :-2].reshape(s, b, g * (rows - 2), d), cos_q, sin_q)
    k = apply_rope(mixed[:, :, :, -2], cos_k, sin_k)
    v = mixed[:, :, :, -1]
    # Compiled, v as an output of its own puts its gradient in the same backward kernel as q's and
    # k's; as a view, autograd would add a zero-filled full-size gradient of `mixed` for it.
    return q, k, v.clone() if own_v else v


def _compiled_split_rope():
    return compiled_pointwise(_split_rope)  # shapes: model/compile_limits.py STATIC_SHAPES
