"""Which files of a step folder (layout: pipeline/checkpointing/files.py) each rank writes and reads.

A training step (pipeline/training/step.py and its layouts) writes its own model and optimizer
shards with the names here; the run around it writes what every layout has: the RNG state of
each rank, the loader position of each DP rank, the trainer state and the resolved config.

    model_tp00.pt / model_tp00_pp01.pt   {"model": weights under global names, "rsp_state": ...}
    optim_tp00.pt                        AdamW state (without ZeRO; DeepSpeed's files otherwise)
    loader_dp000.pt  rng_r00000.pt  trainer.pt  config.yaml

A checkpoint of other TP/PP sizes or another pipeline layout (same DP, no ZeRO) resumes
weights-only (`read_resharded`): the stage files carry global layer names, so their union per TP
rank is that rank's whole shard; model/weights.py merges the TP shards and cuts this run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from model import FAMState
from pipeline.checkpointing.files import load_file, rng_state, set_rng_state
from pipeline.parallel.groups import ProcessGroups


def shard_name(tp_rank: int, pp_rank: int = 0, pp_size: int = 1) -> str:
    """`tp00` (PP = 1, the layout before pipeline parallelism) or `tp00_pp01`."""
    return f"tp{tp_rank:02d}" + (f"_pp{pp_rank:02d}" if pp_size > 1 else "")


def model_file(groups: ProcessGroups) -> str:
    return f"model_{shard_name(groups.tp_rank, groups.pp_rank, groups.pp_size)}.pt"


def optim_file(groups: ProcessGroups) -> str:
    return f"optim_{shard_name(groups.tp_rank, groups.pp_rank, groups.pp_size)}.pt"


def run_files(groups: ProcessGroups, loader, trainer: dict, config_yaml: str) -> dict[str, Any]:
    """What every layout saves besides the step's own shards: RNG on every rank, the loader once
    per DP rank, the trainer state and config on global rank 0."""
    files: dict[str, Any] = {f"rng_r{groups.rank:05d}.pt": rng_state()}
    if groups.tp_rank == 0 and groups.pp_rank == 0:
        files[f"loader_dp{groups.dp_rank:03d}.pt"] = loader.state_dict()
    if groups.rank == 0:
        files["trainer.pt"] = {**trainer, "world_size": groups.world_size, "tp_size": groups.tp_size,
                               "pp_size": groups.pp_size, "dp_size": groups.dp_size}
        files["config.yaml"] = config_yaml
    return files


def load_run_files(path: Path, groups: ProcessGroups, loader, rng: bool = True) -> None:
    """The loader position, and (rng=True: the same layout as the checkpoint's) this rank's RNG."""
    loader.load_state_dict(load_file(path, f"loader_dp{groups.dp_rank:03d}.pt"))
    if rng:
        set_rng_state(load_file(path, f"rng_r{groups.rank:05d}.pt"))


def same_layout(path: Path, trainer: dict, groups: ProcessGroups, chunks: list[int], can_reshard: bool) -> bool:
    """True if the checkpoint was written by this run's sizes and layers per pipeline chunk
    (`chunks`); False if it was not but can be resharded (same DP, `can_reshard`); else ValueError."""
    saved = (trainer["world_size"], trainer["tp_size"], trainer.get("pp_size", 1), trainer["dp_size"],
             trainer.get("pipeline_chunks", chunks))  # a checkpoint from before the layout was recorded: as now
    if saved == (groups.world_size, groups.tp_size, groups.pp_size, groups.dp_size, chunks):
        return True
    if saved[3] == groups.dp_size and can_reshard:
        return False
    raise ValueError(
        f"checkpoint {path} was written by world={saved[0]} TP={saved[1]} PP={saved[2]} DP={saved[3]} with "
        f"layers per pipeline chunk {saved[4]}; this run has world={groups.world_size} TP={groups.tp_size} "
        f"PP={groups.pp_size} DP={groups.dp_size} with {chunks}. Resume with the same DP size (TP, PP and the "
        "layout may change, without ZeRO), or set checkpoint.resume=none with a new checkpoint.dir"
    )


def read_resharded(path: Path, trainer: dict, groups: ProcessGroups,
                   fam_rows: int | None = None) -> tuple[dict, FAMState | None]:
    """This TP rank's weights (global names, on groups.device) and the RSP state from a checkpoint
    of other TP/PP sizes; `fam_rows` is this rank's FAM rows (model/layer.py local_fam_rows: F/tp
    under SP, else F). AdamW moments restart (their layout follows the old split), so the next
    step's loss matches and later ones drift slightly."""
    from model.weights import merge_megatron_shards, shard_megatron_state

    tp_saved, pp_saved = trainer["tp_size"], trainer.get("pp_size", 1)
    by_tp, rsp_by_tp = [], []
    for tp_rank in range(tp_saved):
        state, rsp_layers = {}, None
        for pp_rank in range(pp_saved):
            shard = load_file(path, f"model_{shard_name(tp_rank, pp_rank, pp_saved)}.pt")
            if shard["model"] is None:
                raise ValueError(f"checkpoint {path} holds no plain weights (ZeRO-3): consolidate it first "
                                 "(pipeline/checkpointing/zero_files.py consolidate_zero_checkpoint)")
            state.update(shard["model"])
            if shard["rsp_state"] is not None:  # a stage file holds its own layers' FAM, the others None
                layers = shard["rsp_state"]["layers"]
                rsp_layers = rsp_layers or [dict(layer) for layer in layers]
                for merged, layer in zip(rsp_layers, layers):
                    merged.update({k: v for k, v in layer.items() if v is not None})
        by_tp.append({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        rsp_by_tp.append(rsp_layers)
    full = merge_megatron_shards(by_tp) if tp_saved > 1 else by_tp[0]
    mine = {k: v.to(groups.device) for k, v in shard_megatron_state(full, groups.tp_rank, groups.tp_size).items()}
    if rsp_by_tp[0] is None:
        return mine, None
    saved_sp = bool(yaml.safe_load(load_file(path, "config.yaml")).get("parallel", {}).get("sequence_parallel"))
    layers = [{"fam": _resharded_fam([tp[i]["fam"] for tp in rsp_by_tp], saved_sp, fam_rows, groups.tp_rank),
               "mem_k": None, "mem_v": None} for i in range(len(rsp_by_tp[0]))]  # RSP keeps no memory blocks
    moved = [{k: None if v is None else v.to(groups.device) for k, v in layer.items()} for layer in layers]
    return mine, FAMState.from_dict({"position": 0, "ends_mid_block": False, "layers": moved})


def _resharded_fam(saved: list, saved_sp: bool, rows: int | None, tp_rank: int) -> torch.Tensor | None:
    """One layer's RSP FAM for this rank from the saved TP ranks' [F or F/tp, 1, h]. Without SP every
    TP rank saved all F rows (the same ones); under SP rank r saved rows [r F/tp, (r+1) F/tp), so the
    whole FAM is their concatenation, not TP rank 0's. This rank keeps its `rows` (F/tp under SP)."""
    if saved[0] is None:
        return None
    whole = torch.cat(saved) if saved_sp else saved[0]
    return whole[tp_rank * rows : (tp_rank + 1) * rows] if rows is not None and rows < whole.shape[0] else whole


def rsp_from_dict(saved: dict | None) -> FAMState | None:
    return None if saved is None else FAMState.from_dict(saved)
