"""The per-step RPO and RSP draws and the RSP state's sharing.

RPO and RSP (docs/fam.md, "RPO and RSP"; arXiv 2404.09173 §B.2) draw from a generator seeded by
(train.seed, step), so every TP and DP rank draws the same numbers without communication, a
resumed run draws what the uninterrupted one drew, and nothing about the generator needs
checkpointing. Offsets are drawn for the whole global batch and indexed by a sample's global
batch index (accumulation step a, dp_rank r, row j -> (a * dp + r) * micro + j), which is the
position pipeline/data/loader.py gives that sample, so DP=2 sees the offsets DP=1 sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from model import FAMState
from pipeline.parallel.collectives import broadcast_tensors
from pipeline.parallel.groups import ProcessGroups

_RPO_RSP_STREAM = 0x46414D  # keeps these draws apart from any other use of (seed, step)


@dataclass
class StepDraws:
    offsets: torch.Tensor  # [global batch] RPO position offsets (float32)
    use_saved_fam: bool  # RSP coin: start this step from the saved FAM


def draw_step(seed: int, step: int, global_batch_size: int, rope_base: float, rpo: bool, rsp_probability: float) -> StepDraws:
    """The paper's listing: offset = U[0, 2*pi*rope_base) * round(U[0, 1)), i.e. zero w.p. 0.5;
    the RSP coin is True with probability rsp_probability."""
    rng = np.random.default_rng([seed, step, _RPO_RSP_STREAM])
    coin = bool(rng.random() < rsp_probability)
    offsets = rng.uniform(0.0, 2 * math.pi * rope_base, global_batch_size) * np.round(rng.random(global_batch_size))
    if not rpo:
        offsets[:] = 0.0
    return StepDraws(torch.from_numpy(offsets.astype(np.float32)), coin)


def micro_batch_offsets(draws: StepDraws, accum_index: int, groups: ProcessGroups, micro_batch_size: int) -> torch.Tensor:
    """The offsets of this rank's rows in micro-batch `accum_index` of the step."""
    start = (accum_index * groups.dp_size + groups.dp_rank) * micro_batch_size
    return draws.offsets[start : start + micro_batch_size]


def share_rsp_state(state: FAMState, groups: ProcessGroups) -> FAMState:
    """Every DP rank takes dp_rank 0's saved FAM (the global batch's first sample, as in the
    paper), so data-parallel runs match one process."""
    broadcast_tensors([layer.fam for layer in state.layers if layer.fam is not None], groups.dp_group)
    return state
