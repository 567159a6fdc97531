"""Checkpoints load weights-only: a file carrying a pickled callable, put into a real checkpoint
folder whose sha256 manifest is rewritten to match (so the integrity check passes, as it would for
a checkpoint someone else wrote on a shared filesystem), is refused with an error naming the file,
and the callable never runs. Covers every file of a plain checkpoint, DeepSpeed's optimizer-state
file of a ZeRO-1 checkpoint (which DeepSpeed itself reads with weights_only=False) and ZeRO
consolidation; famtron's own state (RNG, loader, RSP, trainer) round-trips weights-only."""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import pytest
import torch

from data_prep.manifest import sha256_file
from pipeline.checkpointing.files import MANIFEST, UnsafeCheckpointError, load_file, rng_state, save_checkpoint
from pipeline.config.load import load_config
from pipeline.train import run
from tests.conftest import tiny_overrides
from tests.spawn import run_on_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned workers


class Payload:
    """Unpickling this calls open(marker, "w"), creating the marker file: what any pickled callable
    (os.system, exec, ...) would get to do in a weights_only=False load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(folder: Path, name: str, marker: Path) -> None:
    """Replace `name` in a step folder with a file carrying a Payload and make the manifests match
    (a ZeRO folder's own manifest first, since the step's manifest covers it)."""
    torch.save({"step": 3, "payload": Payload(marker)}, folder / name)
    for manifest_dir in ([folder / "zero"] if name.startswith("zero/") else []) + [folder]:
        manifest = json.loads((manifest_dir / MANIFEST).read_text())
        manifest["files"] = {f: sha256_file(manifest_dir / f) for f in manifest["files"]}
        (manifest_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def test_famtron_state_round_trips_weights_only(tmp_path):
    """RNG states (python, numpy, torch), loader-like dicts and tensors: nothing a weights-only load refuses."""
    path = save_checkpoint(tmp_path, 1, {"rng.pt": rng_state(), "loader.pt": {"epoch": 0, "step": 3, "seed": 1}},
                           keep_last=1)
    state = torch.load(path / "rng.pt", weights_only=True)
    assert state["python"]["mt"].dtype == torch.int64 and state["numpy"]["keys"].shape == (624,)
    assert load_file(path, "loader.pt") == {"epoch": 0, "step": 3, "seed": 1}


def test_load_file_refuses_a_pickled_callable_without_running_it(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"trainer.pt": {"step": 1}}, keep_last=1)
    plant_payload(path, "trainer.pt", tmp_path / "marker")
    with pytest.raises(UnsafeCheckpointError, match=r"trainer.pt holds pickled Python objects .*io.open"):
        load_file(path, "trainer.pt")
    assert not (tmp_path / "marker").exists()


@pytest.fixture(scope="module")
def plain_checkpoint(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    summary = run(load_config(None, tiny_overrides(shards, run_dir, train__steps=3, train__eval_interval_steps=0)))
    return Path(summary["last_checkpoint"])


@pytest.mark.parametrize("name", ["trainer.pt", "model_tp00.pt", "optim_tp00.pt", "loader_dp000.pt", "rng_r00000.pt"])
def test_resume_refuses_a_plain_checkpoint_file_with_a_pickled_callable(shards, plain_checkpoint, tmp_path, name):
    folder = tmp_path / "run" / "checkpoints" / plain_checkpoint.name
    shutil.copytree(plain_checkpoint, folder)
    plant_payload(folder, name, tmp_path / "marker")
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"{folder / name} holds pickled Python objects")):
        run(load_config(None, tiny_overrides(shards, tmp_path / "run")))
    assert not (tmp_path / "marker").exists()


def _zero_worker(rank: int, world_size: int, shards: str, run_dir: str, steps: int) -> dict:
    torch.set_num_threads(1)
    try:
        summary = run(load_config(None, tiny_overrides(Path(shards), Path(run_dir), train__steps=steps,
                                                       train__eval_interval_steps=0, parallel__zero_stage=1)))
        return {"checkpoint": summary["last_checkpoint"]}
    except UnsafeCheckpointError as err:
        return {"error": str(err)}


def test_resume_refuses_a_zero_checkpoint_file_with_a_pickled_callable(shards, tmp_path):
    """ZeRO-1 on one process: DeepSpeed's optimizer-state file, which its engine would torch.load
    with weights_only=False, is checked weights-only first; untampered, every file passes with the
    allow-list of DeepSpeed's classes. Consolidation refuses it too."""
    from pipeline.checkpointing.resume import check_files
    from pipeline.checkpointing.zero_files import consolidate_zero_checkpoint

    run_dir = tmp_path / "run"
    folder = Path(run_on_ranks(_zero_worker, 1, str(shards), str(run_dir), 3, timeout_seconds=300)[0]["checkpoint"])
    check_files(folder)  # DeepSpeed's real files pass: the allow-list is enough
    name = "zero/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "marker"
    plant_payload(folder, name, marker)

    result = run_on_ranks(_zero_worker, 1, str(shards), str(run_dir), 6, timeout_seconds=300)[0]
    assert f"{folder / name} holds pickled Python objects" in result.get("error", ""), result
    with pytest.raises(UnsafeCheckpointError, match=Path(name).name):
        consolidate_zero_checkpoint(folder, "zero")
    assert not marker.exists()


class _MemberByName:
    """Pickles as `getattr(cls, name)`: how Python 3.11.2 (Debian 12's python3) pickles an Enum
    member, such as the ZeroStageEnum in DeepSpeed's optimizer-state file; 3.11.7 pickles by value."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_a_zero_stage_pickled_by_name_loads_and_other_getattrs_are_refused(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pipeline.checkpointing.files import torch_load
    from pipeline.checkpointing.zero_files import deepspeed_checkpoint_classes

    torch.save({"zero_stage": _MemberByName(ZeroStageEnum, "optimizer_states")}, tmp_path / "old_python.pt")
    loaded = torch_load(tmp_path / "old_python.pt", allowed=deepspeed_checkpoint_classes())
    assert loaded["zero_stage"] is ZeroStageEnum.optimizer_states
    for cls, name in ((LossScaler, "__init__"), (Path, "unlink"), (ZeroStageEnum, "__class__")):
        torch.save({"x": _MemberByName(cls, name)}, tmp_path / "other.pt")
        with pytest.raises(UnsafeCheckpointError):
            torch_load(tmp_path / "other.pt", allowed=deepspeed_checkpoint_classes())
