"""A spy on the RoPE angles the model code computes, for tests: the positions it really uses.

`install(records)` rebinds every module attribute that holds model.rope.rope_angles (model.rope
itself, whose split_qkv_rope calls it for the block tokens; model.layer for the FAM rows; model.reference;
any other module that imported the name) to a wrapper that appends (module name, positions as a
float64 numpy array) to `records` and then computes the real angles. It returns the undo. Plain
attribute setting, so it works inside spawned worker processes too. Positions on the meta device
(shape inference) are recorded as None.

`documented_fam_positions` is model/reference.py's rule for the FAM rows, written from its
docstring: the FAM that compresses block t has its queries at the block's last F positions, and
as keys (for block t's queries) the FAM entering block t sits at the F positions before it.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch


def install(records: list) -> Callable[[], None]:
    import model.layer  # noqa: F401 - every import site is loaded before the scan
    import model.reference  # noqa: F401
    from model import rope

    original = rope.rope_angles
    sites = [m for m in list(sys.modules.values()) if m is not None and vars(m).get("rope_angles") is original]

    def spy_for(site: str):
        def rope_angles(positions: torch.Tensor, head_dim: int, base: float):
            value = None if positions.is_meta else positions.detach().to(torch.float64).cpu().numpy().copy()
            records.append((site, value))
            return original(positions, head_dim, base)

        return rope_angles

    for module in sites:
        module.rope_angles = spy_for(module.__name__)

    def undo() -> None:
        for module in sites:
            module.rope_angles = original

    return undo


def documented_fam_positions(token_positions: np.ndarray, block_size: int, fam_len: int):
    """token_positions [b, S] -> (FAM query positions [b, T, F], FAM key positions [b, T, F])."""
    b, S = token_positions.shape
    starts = token_positions[:, ::block_size]  # [b, T]
    ends = np.stack([token_positions[:, min(lo + block_size, S) - 1] + 1 for lo in range(0, S, block_size)], axis=1)
    f = np.arange(fam_len) - fam_len
    return ends[:, :, None] + f, starts[:, :, None] + f
