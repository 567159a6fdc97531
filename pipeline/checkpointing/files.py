"""Atomic, verified, rotating checkpoints, written by every rank into one shared folder.

Layout of `<checkpoint.dir>/step_00000100/` (names by rank so TP/DP runs never collide):
    model_tp00.pt     model shard + RSP state of TP rank 0     (written by dp_rank 0 of that TP rank)
    optim_tp00.pt     AdamW state of that shard                 (dp_rank 0 of that TP rank)
    loader_dp000.pt   loader position of DP rank 0              (tp_rank 0 of that DP rank)
    rng_r00000.pt     python/numpy/torch/CUDA RNG of rank 0     (every rank)
    trainer.pt        step, consumed samples, MLflow run id     (global rank 0)
    config.yaml       the resolved config                       (global rank 0)
    manifest.json     sha256 of every file above, written last  (global rank 0)

A save goes into `.tmp_step_XXXXXXXX` next to the final folder; every file is fsynced; rank 0
writes the manifest last and `os.replace`s the folder into place, then deletes checkpoints
beyond `keep_last`. A crash at any point leaves either the old set of complete checkpoints or
the new one, never a half-written `step_*` folder. Complete = manifest present and every
checksum matches; `find_latest_checkpoint` skips (with a warning) anything else.
All ranks write into the same folder, so on several nodes checkpoint.dir must be on a
filesystem they share (as on any Slurm cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from data_prep.manifest import fsync_dir, sha256_file
from pipeline.parallel.collectives import barrier

log = logging.getLogger("famtron")

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step_*` folder, oldest first; temp folders are ignored."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


class _HashingWriter:
    """A file that hashes what passes through it: no second read of a multi-GB shard."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write(path: Path, obj: Any) -> str:
    """Write one file durably (fsync); returns the sha256 of its bytes."""
    with open(path, "wb") as f:
        out = _HashingWriter(f)
        if isinstance(obj, str):
            out.write(obj.encode())
        elif isinstance(obj, bytes):
            out.write(obj)
        else:
            torch.save(obj, out)
        f.flush()
        os.fsync(f.fileno())
    return out.digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Make a file (or a folder's entries) that another library wrote durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> str:
    """sha256 of a file another library wrote, made durable first (its torch.save does not fsync)."""
    fsync_path(path)
    return sha256_file(path)


def _gather_hashes(hashes: dict[str, str]) -> dict[str, str]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return hashes
    gathered: list[dict[str, str]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, hashes)
    merged: dict[str, str] = {}
    for part in gathered:
        clash = set(part) & set(merged)
        if clash:
            raise RuntimeError(f"two ranks wrote the same checkpoint file(s) {sorted(clash)}")
        merged.update(part)
    return merged


def save_checkpoint(ckpt_dir: str | Path, step: int, files: dict[str, Any], keep_last: int, rank: int = 0,
                    write_extra: Callable[[Path], Any] | None = None) -> Path:
    """Collective: every rank calls it with the files it owns ({name: object}; str is written
    as text, anything else with torch.save). `write_extra(folder)`, also collective, writes
    further files into the unfinished folder (DeepSpeed's ZeRO files); the manifest covers
    them too. Returns the final folder."""
    root = Path(ckpt_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_*"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    hashes = _gather_hashes({name: _write(tmp / name, obj) for name, obj in files.items()})
    if write_extra is not None:
        write_extra(tmp)
        barrier()
        if rank == 0:
            for path in sorted(tmp.rglob("*")):
                name = str(path.relative_to(tmp))
                if path.is_file() and name not in hashes:
                    hashes[name] = _hash_file(path)
    if rank == 0:
        manifest = {"step": step, "created_unix": time.time(), "files": dict(sorted(hashes.items()))}
        _write(tmp / MANIFEST, json.dumps(manifest, indent=1))
        fsync_dir(tmp)
        publish_folder(tmp, final)
        for _, stale in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale)
    barrier()
    return final


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place atomically. If `final` exists (the same step
    saved again, e.g. a rerun after a fallback), swap it out first, then delete it."""
    if final.exists():
        old = final.parent / f".tmp_old_{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def verify_checkpoint(path: str | Path) -> str | None:
    """None if complete, else what is wrong (for the warning)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete save)"
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST}: {err}"
    for name, expected in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256_file(path / name) != expected:
            return f"{name} does not match its sha256 in {MANIFEST} (corrupt)"
    return None


def find_latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """Newest complete checkpoint; each newer broken one is skipped with a warning naming it."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; falling back to the previous one", path, problem)
    return None


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects that a weights-only load refuses."""


def _refusal(file: Path, err: pickle.UnpicklingError) -> UnsafeCheckpointError:
    reason = re.search(r"WeightsUnpickler error: (.*?)(?:\. |\.?\n|\.?$)", str(err))
    return UnsafeCheckpointError(
        f"checkpoint file {file} holds pickled Python objects that torch.load(weights_only=True) refuses "
        f"({reason.group(1) if reason else type(err).__name__}); famtron writes only tensors and plain values, so "
        "it was written by someone else or by a famtron older than weights-only checkpoints. Nothing from it was "
        "run. Resume from a checkpoint you trust (checkpoint.resume=<step folder>) or start in a new checkpoint.dir"
    )


def torch_load(file: str | Path, map_location: Any = "cpu", allowed: Iterable[Any] = (), mmap: bool = False) -> Any:
    """torch.load(weights_only=True): tensors, containers and plain values, plus the `allowed`
    classes; anything else (a pickled callable) raises UnsafeCheckpointError before it runs."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _refusal(Path(file), err) from None


def check_weights_only(files: Iterable[Path], allowed: Iterable[Any] = ()) -> None:
    """Refuse (UnsafeCheckpointError naming the file) any file that a weights-only load rejects.
    mmap: only each file's pickle is read, not its tensor bytes, so a large checkpoint is cheap to
    check before a library that loads with weights_only=False (DeepSpeed) gets to it."""
    allowed = list(allowed)
    for file in files:
        torch_load(file, allowed=allowed, mmap=True)


def load_file(path: str | Path, name: str, map_location: Any = "cpu") -> Any:
    """One file of a checkpoint: text for .yaml/.json, else torch.load(weights_only=True), which
    refuses pickled code: the sha256 manifest proves integrity, not who wrote the file."""
    file = Path(path) / name
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} has no {name}: it was written with other parallel sizes than this run's"
        )
    if name.endswith((".yaml", ".json")):
        return file.read_text()
    return torch_load(file, map_location)


# ---------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG a step can draw from, as tensors and plain values (a weights-only load reads
    them back). RPO/RSP draws need none: their generator is re-seeded from (train.seed, step)
    each step, so it is part of the step number."""
    version, mt, gauss_next = random.getstate()  # mt: 624 words + index, each < 2**32
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    try:  # megatron's tensor-parallel RNG tracker (dropout inside TP regions): {name: ByteTensor}
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["megatron_tracker"] = dict(get_cuda_rng_tracker().get_states())
    except Exception:  # no tracker in this setup: nothing to restore
        state["megatron_tracker"] = None
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("megatron_tracker"):
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])
