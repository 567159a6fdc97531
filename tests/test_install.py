"""famtron as an installed package (pyproject.toml, `make install`): after `pip install -e .`
the API imports from any folder, not only from the repository root, and still finds configs/.

The install goes into a temporary prefix with the running interpreter's pip (its packages
provide the dependencies and setuptools), and the check runs isolated (`python -I`: no current
folder, no PYTHONPATH on sys.path) from another folder, so only the install can make it work.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig

from tests.conftest import ROOT
from tests.time_bounds import HANG_GUARD_SECONDS

CHECK = """
import model
m = model.build_model("tiny")
print(model.__file__, m.config.num_layers, m.config.fam_len)
"""


def _python(code: str, cwd, site_dir: str | None = None) -> subprocess.CompletedProcess:
    prelude = f"import site; site.addsitedir({site_dir!r})\n" if site_dir else ""
    return subprocess.run([sys.executable, "-I", "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=HANG_GUARD_SECONDS)


def test_editable_install_makes_the_api_importable_from_any_folder(tmp_path):
    prefix = tmp_path / "prefix"
    site_dir = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = _python("import model", elsewhere)  # outside the repository, not yet installed
    assert missing.returncode != 0 and "No module named 'model'" in missing.stderr, missing.stderr

    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--prefix", str(prefix), "-e", str(ROOT)], capture_output=True, text=True,
                         timeout=HANG_GUARD_SECONDS)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    out = _python(CHECK, elsewhere, site_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(ROOT / "model" / "__init__.py"), "4", "16"]  # configs/tiny.yaml, this checkout
    for package in ("pipeline.train", "data_prep.shard", "slurm.submit", "benchmarks.train_step"):
        assert _python(f"import {package}", elsewhere, site_dir).returncode == 0, package
