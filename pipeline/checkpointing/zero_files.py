"""Saving, loading and consolidating DeepSpeed ZeRO checkpoints (pipeline/parallel/zero.py's engines).

Layout of `<ckpt_dir>/<tag>/` (DeepSpeed's own files, then ours):
    mp_rank_03_model_states.pt                 module + client state of model-parallel rank 3   (ZeRO-1/2)
    zero_pp_rank_1_mp_rank_03_model_states.pt  the same per DP rank                              (ZeRO-3)
    [bf16_]zero_pp_rank_1_mp_rank_03_optim_states.pt   DP rank 1's optimizer partition
    famtron_zero.json                          stage, parallel sizes, parameter names per mp rank
    manifest.json                              sha256 of every file above, written last
"mp rank" is the rank in megatron's TP x PP group (pipeline/parallel/mpu.py's MegatronMPU): PP=1 -> TP rank.

Atomic like pipeline/checkpointing/files.py: every rank writes into `<ckpt_dir>/.tmp_<tag>/`, global rank 0
writes the manifest last and `os.replace`s the folder to `<ckpt_dir>/<tag>`. The manifest has
pipeline/checkpointing/files.py's format, so `verify_checkpoint` / `find_latest_checkpoint` accept these
folders (with tags named `step_XXXXXXXX`).

Resume at another data-parallel size:
  * ZeRO-1/2: directly. to_deepspeed_config sets `zero_optimization.elastic_checkpoint`, so each
    partition's optimizer state is saved per parameter. DeepSpeed 0.19.8's engine refuses another
    DP size, so load_zero_checkpoint loads the module through the engine and hands every saved
    partition to the ZeRO optimizer's elastic merge-and-repartition path (fp32 master weights and
    AdamW moments kept exactly; tested DP=2 -> 1). TP and PP sizes must be unchanged.
  * ZeRO-3 (or another TP/PP): `consolidate_zero_checkpoint` -> plain fp32 state dict per TP rank,
    loaded into a new model; the AdamW moments restart (weights-only resume).

Loading is weights-only: DeepSpeed 0.19.8 reads its files with torch.load(weights_only=False) (its
TorchCheckpointEngine.load, the ZeRO-3 fp32 path and zero_to_fp32 alike), which would run any
pickled callable. So every .pt file of the folder is first read with weights_only=True, allowing
only the classes DeepSpeed really stores (`deepspeed_checkpoint_classes`), before DeepSpeed sees it.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep.manifest import sha256_file
from pipeline.checkpointing.files import MANIFEST, check_weights_only, fsync_path, publish_folder, torch_load
from pipeline.parallel.collectives import barrier

META = "famtron_zero.json"


def deepspeed_checkpoint_classes() -> list:
    """The non-tensor classes DeepSpeed 0.19.8 pickles into a ZeRO checkpoint, found by listing the
    globals of every file it wrote for ZeRO-1/2/3, fp32 and bf16, with and without optimizer
    offload: all in the optimizer-state files (the loss scaler object, the ZeRO stage enum, and
    for ZeRO-1/2 the fragment addresses of parameters). Each is rebuilt from plain attribute
    values (an Enum by value); none runs code of the file's choosing. Python 3.11.2 (Debian 12's
    python3) pickles an Enum member as `getattr(EnumClass, name)` instead: `builtins.getattr` is
    mapped to `_zero_stage_by_name`, which answers only that."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address, (_zero_stage_by_name, "builtins.getattr")]


def _zero_stage_by_name(cls, name):
    """`getattr(ZeroStageEnum, member name)` as an old pickle asks it; anything else is refused."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if cls is ZeroStageEnum and isinstance(name, str) and name in ZeroStageEnum.__members__:
        return ZeroStageEnum[name]
    raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) in a checkpoint: only a ZeroStageEnum member is allowed")


def check_zero_files(path: Path) -> None:
    """Every .pt file of a ZeRO checkpoint folder loads weights-only (UnsafeCheckpointError if not)."""
    check_weights_only(sorted(Path(path).rglob("*.pt")), deepspeed_checkpoint_classes())


def _fsync_tree(root: Path) -> None:
    """DeepSpeed's torch.save does not fsync: make every file and the folder durable."""
    for path in sorted(root.rglob("*")) + [root]:
        fsync_path(path)


def _meta(engine) -> dict:
    """What consolidation needs besides DeepSpeed's files: every mp rank's plain names."""
    mpu = engine.mpu
    own = {"tp_rank": mpu.get_tensor_model_parallel_rank(), "pp_rank": mpu.get_pipeline_model_parallel_rank(),
           "names": engine.module.plain_names()}
    ranks = [None] * mpu.get_model_parallel_world_size()
    dist.all_gather_object(ranks, own, group=mpu.get_model_parallel_group())
    return {
        "zero_stage": int(engine.zero_optimization_stage()),
        "tp_size": mpu.get_tensor_model_parallel_world_size(),
        "pp_size": mpu.get_pipeline_model_parallel_world_size(),
        "dp_size": mpu.get_data_parallel_world_size(),
        "mp_ranks": ranks,  # index = mp rank
    }


def save_zero_checkpoint(engine, ckpt_dir: str | Path, tag: str, client_state: dict[str, Any] | None = None,
                         step: int | None = None) -> Path:
    """Collective. Writes `<ckpt_dir>/<tag>` atomically; `client_state` (trainer step, loader,
    ...) is stored by DeepSpeed with the module and returned by load_zero_checkpoint. `step`:
    DeepSpeed 0.19.8's elastic ZeRO-1/2 load asserts a "step" in the optimizer's param groups,
    which torch's AdamW keeps per parameter instead, so it is recorded where DeepSpeed looks."""
    if step is not None:
        for group in getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups:
            group["step"] = step
    root = Path(ckpt_dir)
    final, tmp = root / tag, root / f".tmp_{tag}"
    meta = _meta(engine)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state or {}, save_latest=False)
    barrier()
    if dist.get_rank() == 0:
        (tmp / META).write_text(json.dumps(meta, indent=1))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"tag": tag, "created_unix": time.time(), "files": files}, indent=1))
        _fsync_tree(tmp)
        publish_folder(tmp, final)
    barrier()
    return final


def load_zero_checkpoint(engine, ckpt_dir: str | Path, tag: str, load_optimizer_states: bool = True) -> dict:
    """Collective. Loads module, ZeRO optimizer partitions (re-partitioned for ZeRO-1/2 when the
    DP size changed) and returns the client state. Refuses a ZeRO-3 or TP/PP change: consolidate."""
    path = Path(ckpt_dir) / tag
    meta = json.loads((path / META).read_text())
    check_zero_files(path)  # before DeepSpeed's own torch.load(weights_only=False) reads any of them
    mpu = engine.mpu
    now = {"zero_stage": int(engine.zero_optimization_stage()), "tp_size": mpu.get_tensor_model_parallel_world_size(),
           "pp_size": mpu.get_pipeline_model_parallel_world_size(), "dp_size": mpu.get_data_parallel_world_size()}
    saved = {k: meta[k] for k in now}
    fixed = ("zero_stage", "tp_size", "pp_size") if meta["zero_stage"] in (1, 2) else tuple(now)
    changed = [k for k in fixed if saved[k] != now[k]]
    if changed:
        raise ValueError(
            f"ZeRO checkpoint {path} was written with {saved}; this run has {now}. ZeRO-1/2 checkpoints resume at "
            "another DP size only; otherwise consolidate_zero_checkpoint and load the plain weights"
        )
    resize = saved["dp_size"] != now["dp_size"] and load_optimizer_states
    # DeepSpeed's engine refuses optimizer state saved at another DP size (only its "universal"
    # format, a separate offline conversion, re-partitions). Its ZeRO-1/2 optimizer can merge and
    # re-partition elastic checkpoints itself, so the engine loads the module only and the
    # optimizer partitions are loaded below.
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer_states and not resize,
                                               load_lr_scheduler_states=False,
                                               load_module_only=resize or not load_optimizer_states)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")
    if resize:
        _load_resized_partitions(engine, path, saved["dp_size"])
    # The ZeRO optimizer restores its clip value from the checkpoint; this run's config decides.
    engine.optimizer.clip_grad = engine.gradient_clipping()
    return client


class _EveryRank(list):
    """The saved partitions, for a DP rank beyond their count when the DP size grew: DeepSpeed
    reads its own entry only for scalars that every partition holds alike (step, loss scale)."""

    def __getitem__(self, index):
        if isinstance(index, int) and index >= len(self):
            index = 0
        return super().__getitem__(index)


def _load_resized_partitions(engine, path: Path, saved_dp: int) -> None:
    """Every saved DP partition of this mp rank -> merged and re-partitioned by DeepSpeed's elastic
    ZeRO-1/2 path (fp32 master weights and AdamW moments exactly)."""
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE_STEP

    mp = engine.mpu.get_model_parallel_rank()
    prefix = "bf16_" if engine.bfloat16_enabled() else ""
    states = _EveryRank()
    for dp_rank in range(saved_dp):
        file = path / f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"
        states.append(torch_load(file, allowed=deepspeed_checkpoint_classes())["optimizer_state_dict"])
    for state in states:  # torch's AdamW keeps `step` per parameter, DeepSpeed expects a group-level one
        state.setdefault(BASE_OPTIMIZER_STATE_STEP, None)
    engine.optimizer.load_state_dict(state_dict_list=states, load_optimizer_states=True, load_from_fp32_weights=True)
    for group in engine.optimizer.param_groups:
        if "step" in group and group["step"] is None:
            del group["step"]


_MP_RANK = re.compile(r"mp_rank_(\d+)_")


def consolidate_zero_checkpoint(ckpt_dir: str | Path, tag: str, out_dir: str | Path | None = None) -> list[dict]:
    """Plain fp32 state dicts of the FAMLanguageModel, one per TP rank (full across DP and PP), from a
    ZeRO checkpoint; no processes needed. With out_dir, also writes `model_tp{r:02d}.pt` there.
    DeepSpeed's zero_to_fp32 reads one mp rank (named 00) per folder, so each mp rank's files are
    linked under that name into a scratch folder first."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(ckpt_dir) / tag
    meta = json.loads((path / META).read_text())
    check_zero_files(path)  # zero_to_fp32 loads with weights_only=False
    by_tp: list[dict[str, Any]] = [{} for _ in range(meta["tp_size"])]
    for mp_rank, info in enumerate(meta["mp_ranks"]):
        with tempfile.TemporaryDirectory() as scratch:
            one = Path(scratch) / "one"
            one.mkdir()
            for f in path.iterdir():
                m = _MP_RANK.search(f.name)
                if m and int(m.group(1)) == mp_rank:
                    (one / _MP_RANK.sub("mp_rank_00_", f.name)).symlink_to(f.resolve())
            state = get_fp32_state_dict_from_zero_checkpoint(scratch, tag="one")
        names = info["names"]
        for name, value in state.items():
            by_tp[info["tp_rank"]][names[name]] = value.detach().float().contiguous()
        for name, plain in names.items():  # megatron's per-Linear placeholders (None), not weights
            if plain.endswith("_extra_state"):
                by_tp[info["tp_rank"]][plain] = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for tp_rank, sd in enumerate(by_tp):
            torch.save(sd, out / f"model_tp{tp_rank:02d}.pt")
    return by_tp
