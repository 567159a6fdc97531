"""What a training step carries besides weights: the per-step RPO/RSP draws, the RSP state,
the checkpoint files each rank owns (see pipeline/checkpoint.py for the layout), and which
checkpoint a run resumes from, checked before the model is built (its config, its files' safety).

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
import yaml

from model import FAMState
from pipeline.checkpoint import (check_weights_only, find_latest_checkpoint, list_checkpoints, load_file, rng_state,
                                 set_rng_state, verify_checkpoint)
from pipeline.config import CheckpointConfig, Config
from pipeline.config_checks import check_resume_config
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


def shard_name(ranks: Ranks) -> str:
    """`tp00` (PP = 1, the layout before pipeline parallelism) or `tp00_pp01`."""
    return f"tp{ranks.tp_rank:02d}" + (f"_pp{ranks.pp_rank:02d}" if ranks.pp_size > 1 else "")


def model_state(model, stages) -> dict[str, Any]:
    """The plain model's state dict, or this rank's pipeline stages' under global layer names
    (pipeline_parallel.stage_state_dict), so a checkpoint maps onto another pipeline split."""
    if stages is None:
        return model.state_dict()
    from pipeline.pipeline_parallel import stage_state_dict

    return stage_state_dict(stages)


def load_model_state(model, stages, state: dict[str, Any]) -> None:
    if stages is None:
        model.load_state_dict(state)
    else:
        from pipeline.pipeline_parallel import load_stage_state_dict

        load_stage_state_dict(stages, state)


def checkpoint_files(ranks: Ranks, model, optimizer, loader, rsp_state: FAMState | None, trainer: dict, config_yaml: str,
                     stages=None, zero_stage: int = 0) -> dict[str, Any]:
    """The files this rank writes: shards once per TP x PP rank, loader once per DP rank. With
    ZeRO the engine writes weights and optimizer state (a `zero/` folder, what resume loads); the
    shard file keeps the RSP state and, for ZeRO-1/2 (whose weights are whole on every rank), the
    weights for consolidation-free resharding."""
    files: dict[str, Any] = {f"rng_r{ranks.rank:05d}.pt": rng_state()}
    if ranks.dp_rank == 0:
        rsp = None if rsp_state is None else rsp_state.to_dict()
        weights = None if zero_stage == 3 else model_state(model, stages)
        files[f"model_{shard_name(ranks)}.pt"] = {"model": weights, "rsp_state": rsp}
        if not zero_stage:
            files[f"optim_{shard_name(ranks)}.pt"] = optimizer.state_dict()
    if ranks.tp_rank == 0 and ranks.pp_rank == 0:
        files[f"loader_dp{ranks.dp_rank:03d}.pt"] = loader.state_dict()
    if ranks.rank == 0:
        files["trainer.pt"] = {**trainer, "world_size": ranks.world_size, "tp_size": ranks.tp_size,
                               "pp_size": ranks.pp_size, "dp_size": ranks.dp_size}
        files["config.yaml"] = config_yaml
    return files


def pipeline_chunks(cfg: Config) -> list[int]:
    """Layers per pipeline chunk (stage x virtual stage) in model order: [num_layers] without PP."""
    from pipeline.pipeline_parallel import split_layers

    p = cfg.parallel
    return [len(r) for r in split_layers(cfg.model.num_layers, p.pipeline_parallel_size * p.virtual_stages,
                                         p.pipeline_layout)]


def restore(path: Path, ranks: Ranks, model, optimizer, loader, device: torch.device, stages=None,
            engine=None, chunks: list[int] | None = None) -> tuple[dict, FAMState | None]:
    """Load this rank's part of a checkpoint; returns (trainer dict, RSP state). A checkpoint of
    other TP/PP sizes or another pipeline layout (`chunks`, pipeline_chunks; same DP, no ZeRO here)
    resumes weights-only: see `restore_resharded`."""
    trainer = load_file(path, "trainer.pt")
    saved = (trainer["world_size"], trainer["tp_size"], trainer.get("pp_size", 1), trainer["dp_size"],
             trainer.get("pipeline_chunks", chunks))  # a checkpoint from before the layout was recorded: as now
    if saved != (ranks.world_size, ranks.tp_size, ranks.pp_size, ranks.dp_size, chunks):
        if saved[3] == ranks.dp_size and engine is None:
            return restore_resharded(path, trainer, ranks, model, loader, device, stages)
        raise ValueError(
            f"checkpoint {path} was written by world={saved[0]} TP={saved[1]} PP={saved[2]} DP={saved[3]} with "
            f"layers per pipeline chunk {saved[4]}; this run has world={ranks.world_size} TP={ranks.tp_size} "
            f"PP={ranks.pp_size} DP={ranks.dp_size} with {chunks}. Resume with the same DP size (TP, PP and the "
            "layout may change, without ZeRO), or set checkpoint.resume=none with a new checkpoint.dir"
        )
    shard = load_file(path, f"model_{shard_name(ranks)}.pt", map_location=device)
    if engine is not None:
        from pipeline.zero_checkpoint import load_zero_checkpoint

        load_zero_checkpoint(engine, path, "zero")
    else:
        load_model_state(model, stages, shard["model"])
        optimizer.load_state_dict(load_file(path, f"optim_{shard_name(ranks)}.pt", map_location=device))
    loader.load_state_dict(load_file(path, f"loader_dp{ranks.dp_rank:03d}.pt"))
    set_rng_state(load_file(path, f"rng_r{ranks.rank:05d}.pt"))
    rsp = None if shard["rsp_state"] is None else FAMState.from_dict(shard["rsp_state"])
    return trainer, rsp


def restore_resharded(path: Path, trainer: dict, ranks: Ranks, model, loader, device: torch.device,
                      stages=None) -> tuple[dict, FAMState | None]:
    """Weights, loader position and RSP state from a checkpoint of other TP/PP sizes: the stage
    files carry global layer names, so their union per TP rank is that rank's whole shard;
    model.weights merges the TP shards and cuts this run's. AdamW moments restart (their layout
    follows the old split), so the next step's loss matches and later ones drift slightly."""
    from model.weights import merge_megatron_shards, shard_megatron_state

    tp_saved, pp_saved = trainer["tp_size"], trainer.get("pp_size", 1)
    by_tp, rsp_by_tp = [], []
    for tp_rank in range(tp_saved):
        state, rsp_layers = {}, None
        for pp_rank in range(pp_saved):
            shard = load_file(path, f"model_{shard_name(Ranks(tp_rank=tp_rank, pp_rank=pp_rank, pp_size=pp_saved))}.pt")
            if shard["model"] is None:
                raise ValueError(f"checkpoint {path} holds no plain weights (ZeRO-3): consolidate it first "
                                 "(pipeline/zero_checkpoint.py consolidate_zero_checkpoint)")
            state.update(shard["model"])
            if shard["rsp_state"] is not None:  # a stage file holds its own layers' FAM, the others None
                layers = shard["rsp_state"]["layers"]
                rsp_layers = rsp_layers or [dict(layer) for layer in layers]
                for merged, layer in zip(rsp_layers, layers):
                    merged.update({k: v for k, v in layer.items() if v is not None})
        by_tp.append({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        rsp_by_tp.append(rsp_layers)
    full = merge_megatron_shards(by_tp) if tp_saved > 1 else by_tp[0]
    mine = {k: v.to(device) for k, v in shard_megatron_state(full, ranks.tp_rank, ranks.tp_size).items()}
    if stages is None:
        model.load_state_dict({k: v if k.endswith("_extra_state") else mine[k] for k, v in model.state_dict().items()})
    else:
        load_model_state(model, stages, mine)
    loader.load_state_dict(load_file(path, f"loader_dp{ranks.dp_rank:03d}.pt"))
    if rsp_by_tp[0] is None:
        return trainer, None
    saved_sp = bool(yaml.safe_load(load_file(path, "config.yaml")).get("parallel", {}).get("sequence_parallel"))
    rows = _local_fam_rows(model)
    layers = [{"fam": _resharded_fam([tp[i]["fam"] for tp in rsp_by_tp], saved_sp, rows, ranks.tp_rank),
               "mem_k": None, "mem_v": None} for i in range(len(rsp_by_tp[0]))]  # RSP keeps no memory blocks
    moved = [{k: None if v is None else v.to(device) for k, v in layer.items()} for layer in layers]
    return trainer, FAMState.from_dict({"position": 0, "ends_mid_block": False, "layers": moved})


def _local_fam_rows(model) -> int | None:
    """F rows of the hidden tensor on this rank (model/layer.py: F/tp under SP, else F)."""
    return next((m.local_fam_rows for m in model.modules() if hasattr(m, "local_fam_rows")), None)


def _resharded_fam(saved: list, saved_sp: bool, rows: int | None, tp_rank: int) -> torch.Tensor | None:
    """One layer's RSP FAM for this rank from the saved TP ranks' [F or F/tp, 1, h]. Without SP every
    TP rank saved all F rows (the same ones); under SP rank r saved rows [r F/tp, (r+1) F/tp), so the
    whole FAM is their concatenation, not TP rank 0's. This rank keeps its `rows` (F/tp under SP)."""
    if saved[0] is None:
        return None
    whole = torch.cat(saved) if saved_sp else saved[0]
    return whole[tp_rank * rows : (tp_rank + 1) * rows] if rows is not None and rows < whole.shape[0] else whole


@dataclass
class Resume:
    path: Path  # the step folder
    step: int  # its trainer step


def resolve_resume(cfg: Config, ranks: Ranks) -> Resume | None:
    """The checkpoint to start from, decided on rank 0 (one reader of the folder) and
    broadcast, so every rank loads the same step; errors are raised on every rank. Before any
    model is built: the checkpoint's config differs from this run's only in keys safe to change
    (config_checks.check_resume_config), and every file loads weights-only (check_files)."""
    choice: Resume | Exception | None = None
    if ranks.is_rank0:
        try:
            path = choose_checkpoint(cfg.checkpoint)
            if path is not None:
                check_resume_config(load_file(path, "config.yaml"), cfg, path)
                check_files(path)
                choice = Resume(path, int(load_file(path, "trainer.pt")["step"]))
        except Exception as err:  # noqa: BLE001 - raised on every rank below, not only here
            choice = err
    choice = broadcast_object(choice)
    if isinstance(choice, Exception):
        raise choice
    return choice


def choose_checkpoint(cfg: CheckpointConfig) -> Path | None:
    """checkpoint.resume: auto -> the newest complete checkpoint (or None); none -> None, refusing
    a folder that already holds checkpoints; a path -> that folder, if complete."""
    if cfg.resume == "auto":
        return find_latest_checkpoint(cfg.dir)
    if cfg.resume == "none":
        existing = list_checkpoints(cfg.dir)
        if existing:  # mixing two runs' checkpoints in one folder would make `auto` pick either
            raise ValueError(
                f"checkpoint.resume=none but checkpoint.dir={cfg.dir} already holds {existing[-1][1].name}; "
                "use checkpoint.resume=auto, another checkpoint.dir, or delete the old checkpoints"
            )
        return None
    problem = verify_checkpoint(cfg.resume)
    if problem:
        raise ValueError(f"checkpoint.resume={cfg.resume}: {problem}")
    return Path(cfg.resume)


def check_files(path: Path) -> None:
    """Every .pt file of a step folder loads with torch.load(weights_only=True): famtron's own
    files with nothing beyond tensors and plain values, DeepSpeed's (`zero/`) with the few classes
    it stores. UnsafeCheckpointError names the first file that does not."""
    own = sorted(p for p in path.rglob("*.pt") if "zero" not in p.relative_to(path).parts[:-1])
    check_weights_only(own)
    if (path / "zero").is_dir():
        from pipeline.zero_checkpoint import check_zero_files

        check_zero_files(path / "zero")
