"""famtron as an installed package (pyproject.toml, `make install`): after `pip install -e .`
the API imports from any folder, not only from the repository root, and still finds configs/.

The check runs in a fresh virtual environment that sees this interpreter's packages (torch,
megatron, ...) as plain path entries, so an editable famtron already installed here (as `make
install` does) is not active in it: `import model` fails there until the install under test
(into a temporary prefix, with this interpreter's pip and setuptools) is added. It runs isolated
(`python -I`: no current folder, no PYTHONPATH) from another folder.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv

from tests.conftest import ROOT
from tests.time_bounds import HANG_GUARD_SECONDS

CHECK = """
import importlib
import model
m = model.build_model("tiny")
print(model.__file__, m.config.num_layers, m.config.fam_len)
for package in ("pipeline.train", "data_prep.shard", "slurm.submit", "benchmarks.train_step"):
    importlib.import_module(package)  # one process for all: each new one pays ~9 s of torch and megatron imports
"""


def _bare_python(root) -> str:
    """A new venv's python whose sys.path holds this interpreter's site-packages, but whose .pth
    files (an editable famtron's among them) are not run."""
    venv.EnvBuilder(with_pip=False).create(root)
    python = str(root / "bin" / "python")
    site_dir = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True, timeout=HANG_GUARD_SECONDS).stdout.strip()
    paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    with open(f"{site_dir}/outer_site_packages.pth", "w") as f:  # plain lines: path entries, not site dirs
        f.write("\n".join(paths) + "\n")
    return python


def _python(python: str, code: str, cwd, site_dir: str | None = None) -> subprocess.CompletedProcess:
    prelude = f"import site; site.addsitedir({site_dir!r})\n" if site_dir else ""
    return subprocess.run([python, "-I", "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=HANG_GUARD_SECONDS)


def test_editable_install_makes_the_api_importable_from_any_folder(tmp_path):
    python = _bare_python(tmp_path / "venv")
    prefix = tmp_path / "prefix"
    site_dir = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = _python(python, "import torch, megatron.core\nimport model", elsewhere)  # dependencies yes, famtron no
    assert missing.returncode != 0 and "No module named 'model'" in missing.stderr, missing.stderr

    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--prefix", str(prefix), "-e", str(ROOT)], capture_output=True, text=True,
                         timeout=HANG_GUARD_SECONDS)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    out = _python(python, CHECK, elsewhere, site_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(ROOT / "model" / "__init__.py"), "4", "16"]  # configs/tiny.yaml, this checkout
