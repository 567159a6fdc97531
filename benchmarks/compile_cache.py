"""A torch.compile cache that travels: `benchmarks.train_step --compile-cache DIR`.

Why: each benchmark process compiles the FAM scan's steps, FlexAttention and the fused pointwise
ops for its shapes. On a machine that never compiled them, fam-1b and bswa-1b at one sequence
length took 170-250 s on an H200 before the first timed step (benchmarks/results/2026-12-01-1xH200,
call B: two rows lost to their time limits). Most of that is Triton compiling kernels. torch's
cache artifacts (`torch.compiler.save_cache_artifacts`) hold the compiled graphs and kernels in one
portable blob (inductor's FX graph cache, AOTAutograd's, the kernels). So a run on the same torch
and card, on any machine, starts warm: dynamo still traces each graph, but nothing is compiled
again.

How: DIR holds blobs, one per process that compiled something new.
  - `load(DIR)` runs before anything compiles and puts every blob's artifacts into this process's
    caches.
  - `save(DIR)` runs after each benchmark row. It writes this process's blob, holding everything
    the process compiled or used: a run killed by its time limit keeps the rows it finished. It
    rewrites the blob whole (a temp file, then a rename). A process that met nothing new writes
    nothing.
  - Different shapes in different processes add blobs side by side: the folder is their union.

Tried on GPU once (one H200, 2026-12-01, benchmarks/results/2026-12-01-1xH200, session 16): it did not
save time. Call B compiled fam-1b and bswa-1b at 8k, micro-batch 4, from nothing in about 170 s and
saved a 55 MiB blob (70 artifacts; 7.9 MB gzipped, so it can be carried to the next machine). Call C
loaded that blob on a fresh machine. The load reported 7 artifacts, and the same run had not finished
its first row after 200 s. Why only 7 of the 70 loaded, and whether the cache hit at all, was not
found out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


class CompileCache:
    """One process's view of a cache folder: what it loaded, and the blob it writes."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.blob = self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.bin"
        self.loaded: set[str] = set()
        self.saved: set[str] = set()

    def load(self) -> int:
        """Every blob's artifacts into this process's caches; returns how many artifacts."""
        if self.folder.exists() and not self.folder.is_dir():
            raise SystemExit(f"--compile-cache {self.folder}: not a folder; give a folder (made if missing)")
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob("*.bin")):
            try:  # torch logs a corrupt blob and returns None; other failures raise
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
                error = "" if info is not None else "its checksum or format does not match"
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
            if error:
                raise SystemExit(f"{path} is not a torch.compile cache blob ({error}): delete it or give another "
                                 "--compile-cache")
            self.loaded |= _keys(info)
        print(f"compile cache: {len(self.loaded)} artifacts loaded from {self.folder}", flush=True)
        return len(self.loaded)

    def save(self) -> int:
        """This process's artifacts into its blob, if it has any the folder lacked; returns how many."""
        found = torch.compiler.save_cache_artifacts()
        if found is None:
            return 0
        data, info = found
        keys = _keys(info)
        if keys <= self.loaded or keys == self.saved:
            return 0
        tmp = self.blob.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.blob)
        self.saved = keys
        print(f"compile cache: {len(keys - self.loaded)} new artifacts, {len(data) / 2**20:.1f} MiB in "
              f"{self.blob}", flush=True)
        return len(keys)


def _keys(info) -> set[str]:
    return {f"{kind}:{key}" for kind, keys in (info.artifacts if info else {}).items() for key in keys}
