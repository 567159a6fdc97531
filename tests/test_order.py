"""`pytest --order reverse|shuffle:SEED` (tests/conftest.py): the order the GPU tests must pass in
(issue 13, "in any order"), checked by collecting a file of trivial tests with the project's
conftest as a plugin (no torch to import: a second per collection)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.time_bounds import HANG_GUARD_SECONDS


def _collect(folder: Path, *args: str) -> subprocess.CompletedProcess:
    (folder / "test_six.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(6)))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "--collect-only", "-q",
                           str(folder / "test_six.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_GUARD_SECONDS)


def _collected(folder: Path, *args: str) -> list[str]:
    out = _collect(folder, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line.rsplit("::", 1)[1] for line in out.stdout.splitlines() if "::" in line]


def test_reverse_and_shuffle_reorder_the_same_tests(tmp_path):
    written = _collected(tmp_path)
    assert written == [f"test_{i}" for i in range(6)]
    assert _collected(tmp_path, "--order", "reverse") == written[::-1]
    shuffled = _collected(tmp_path, "--order", "shuffle:1")
    assert sorted(shuffled) == sorted(written) and shuffled != written
    assert _collected(tmp_path, "--order", "shuffle:1") == shuffled  # the seed fixes it


def test_an_unknown_order_is_refused_with_the_choices(tmp_path):
    out = _collect(tmp_path, "--order", "random")
    assert out.returncode != 0 and "use file, reverse or shuffle:SEED" in out.stderr
