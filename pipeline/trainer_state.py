"""What a training step carries besides weights: the per-step RPO/RSP draws, the RSP state,
and the checkpoint files each rank owns (see pipeline/checkpoint.py for the layout).

RPO and RSP (fam-paper.md §1.6) draw from a generator seeded by (train.seed, step), so every
TP and DP rank draws the same numbers without communication, a resumed run draws what the
uninterrupted one drew, and nothing about the generator needs checkpointing. Offsets are drawn
for the whole global batch and indexed by a sample's global batch index
(accumulation step a, dp_rank r, row j -> (a * dp + r) * micro + j), which is the position
pipeline/data.py gives that sample, so DP=2 sees the offsets DP=1 sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import FAMState
from pipeline.checkpoint import find_latest_checkpoint, list_checkpoints, load_file, rng_state, set_rng_state, verify_checkpoint
from pipeline.config import CheckpointConfig
from pipeline.distributed import Ranks, broadcast_object, broadcast_tensors

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


def micro_batch_offsets(draws: StepDraws, accum_index: int, ranks: Ranks, micro_batch_size: int) -> torch.Tensor:
    """The offsets of this rank's rows in micro-batch `accum_index` of the step."""
    start = (accum_index * ranks.dp_size + ranks.dp_rank) * micro_batch_size
    return draws.offsets[start : start + micro_batch_size]


def share_rsp_state(state: FAMState, ranks: Ranks) -> FAMState:
    """Every DP rank takes dp_rank 0's saved FAM (the global batch's first sample, as in the
    paper), so data-parallel runs match one process."""
    broadcast_tensors([layer.fam for layer in state.layers if layer.fam is not None], ranks.dp_group)
    return state


# ---------------------------------------------------------------- checkpoint files


def checkpoint_files(ranks: Ranks, model, optimizer, loader, rsp_state: FAMState | None, trainer: dict, config_yaml: str) -> dict[str, Any]:
    """The files this rank writes: shards once per TP rank, loader once per DP rank."""
    files: dict[str, Any] = {f"rng_r{ranks.rank:05d}.pt": rng_state()}
    if ranks.dp_rank == 0:
        rsp = None if rsp_state is None else rsp_state.to_dict()
        files[f"model_tp{ranks.tp_rank:02d}.pt"] = {"model": model.state_dict(), "rsp_state": rsp}
        files[f"optim_tp{ranks.tp_rank:02d}.pt"] = optimizer.state_dict()
    if ranks.tp_rank == 0:
        files[f"loader_dp{ranks.dp_rank:03d}.pt"] = loader.state_dict()
    if ranks.rank == 0:
        files["trainer.pt"] = {**trainer, "world_size": ranks.world_size, "tp_size": ranks.tp_size, "dp_size": ranks.dp_size}
        files["config.yaml"] = config_yaml
    return files


def restore(path: Path, ranks: Ranks, model, optimizer, loader, device: torch.device) -> tuple[dict, FAMState | None]:
    """Load this rank's part of a checkpoint; returns (trainer dict, RSP state)."""
    trainer = load_file(path, "trainer.pt")
    saved = (trainer["world_size"], trainer["tp_size"], trainer["dp_size"])
    if saved != (ranks.world_size, ranks.tp_size, ranks.dp_size):
        raise ValueError(
            f"checkpoint {path} was written by world={saved[0]} TP={saved[1]} DP={saved[2]}; this run has "
            f"world={ranks.world_size} TP={ranks.tp_size} DP={ranks.dp_size}. Resume with the same sizes "
            "(resharding is not supported), or set checkpoint.resume=none with a new checkpoint.dir"
        )
    shard = load_file(path, f"model_tp{ranks.tp_rank:02d}.pt", map_location=device)
    model.load_state_dict(shard["model"])
    optimizer.load_state_dict(load_file(path, f"optim_tp{ranks.tp_rank:02d}.pt", map_location=device))
    loader.load_state_dict(load_file(path, f"loader_dp{ranks.dp_rank:03d}.pt"))
    set_rng_state(load_file(path, f"rng_r{ranks.rank:05d}.pt"))
    rsp = None if shard["rsp_state"] is None else FAMState.from_dict(shard["rsp_state"])
    return trainer, rsp


def resolve_resume(cfg: CheckpointConfig, ranks: Ranks) -> Path | None:
    """The checkpoint to start from, decided on rank 0 (one reader of the folder) and
    broadcast, so every rank loads the same step; errors are raised on every rank."""
    choice: Path | Exception | None = None
    if ranks.is_rank0:
        if cfg.resume == "auto":
            choice = find_latest_checkpoint(cfg.dir)
        elif cfg.resume == "none":
            existing = list_checkpoints(cfg.dir)
            if existing:  # mixing two runs' checkpoints in one folder would make `auto` pick either
                choice = ValueError(
                    f"checkpoint.resume=none but checkpoint.dir={cfg.dir} already holds {existing[-1][1].name}; "
                    "use checkpoint.resume=auto, another checkpoint.dir, or delete the old checkpoints"
                )
        else:
            problem = verify_checkpoint(cfg.resume)
            choice = ValueError(f"checkpoint.resume={cfg.resume}: {problem}") if problem else Path(cfg.resume)
    choice = broadcast_object(choice)
    if isinstance(choice, Exception):
        raise choice
    return choice
