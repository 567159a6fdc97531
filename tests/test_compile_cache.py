"""benchmarks/compile_cache.py (`benchmarks.train_step --compile-cache DIR`): compiled graphs that travel.

Three processes share one cache folder, each with its own empty inductor cache, as on a machine that
never compiled anything:
  - the first compiles a function and writes a blob;
  - the second loads it and compiles the same function from the cache (an FX graph cache hit, no
    miss), and writes nothing;
  - the third compiles another function and adds a second blob beside the first.
Were nothing loaded, the second process would miss, and the test would go red.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compile_cache import CompileCache

REPO = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 300  # one small CPU compile takes about 10 s; a busy 2-core CI machine, far more

SCRIPT = """
import sys, torch
from torch._dynamo.utils import counters
from benchmarks.compile_cache import CompileCache
cache = CompileCache(sys.argv[1])
loaded = cache.load()
fn = {"a": lambda x: torch.sin(x) * x + 1, "b": lambda x: torch.cos(x) - 2 * x}[sys.argv[2]]
torch.compile(fn)(torch.randn(8, 8))
saved = cache.save()
inductor = counters["inductor"]
print("RESULT", loaded, saved, inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"])
"""


def _process(folder: Path, fn: str, inductor_dir: Path) -> tuple[int, ...]:
    """(artifacts loaded, artifacts saved, FX graph cache hits, misses) of one fresh process."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), fn], env=env, capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT_S, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(text for text in done.stdout.splitlines() if text.startswith("RESULT"))
    return tuple(int(x) for x in line.split()[1:])


def test_a_fresh_process_compiles_from_the_folder_and_new_graphs_add_a_blob(tmp_path):
    folder = tmp_path / "cache"
    loaded, saved, hits, misses = _process(folder, "a", tmp_path / "inductor1")
    assert (loaded, hits) == (0, 0) and saved >= 1 and misses >= 1
    blobs = sorted(folder.glob("*.bin"))
    assert len(blobs) == 1 and not list(folder.glob("*.tmp"))

    loaded, saved, hits, misses = _process(folder, "a", tmp_path / "inductor2")
    assert loaded >= 1 and hits >= 1 and misses == 0, (loaded, hits, misses)
    assert saved == 0 and sorted(folder.glob("*.bin")) == blobs  # nothing new: nothing written

    loaded, saved, hits, misses = _process(folder, "b", tmp_path / "inductor3")
    assert misses >= 1 and saved >= 1
    assert len(list(folder.glob("*.bin"))) == 2


def test_a_blob_that_is_not_a_cache_or_a_file_for_the_folder_names_itself(tmp_path):
    (tmp_path / "20261201-0-1.bin").write_bytes(b"not a cache")
    with pytest.raises(SystemExit, match=r"20261201-0-1.bin is not a torch.compile cache blob .* delete it or give "
                                         r"another --compile-cache"):
        CompileCache(tmp_path).load()
    assert (tmp_path / "20261201-0-1.bin").read_bytes() == b"not a cache"  # left as it was
    with pytest.raises(SystemExit, match=r"--compile-cache .*20261201-0-1.bin: not a folder"):
        CompileCache(tmp_path / "20261201-0-1.bin").load()
