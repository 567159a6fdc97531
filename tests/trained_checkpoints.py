"""Tiny checkpoints trained by pipeline.train on the real shards (tests/conftest.py), for the tests of
the commands that read checkpoints (pipeline.generate, export_hf, import_hf, evaluate), and the way
those tests run a command: a subprocess whose bad input must end in one stderr line and exit 2, or,
for a test's further bad inputs of a command one subprocess already ran, the command's `main` in
this process (each new process spends ~9 s importing torch and megatron; CI has 2 cores)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config.load import load_config
from tests.conftest import tiny_overrides
from tests.time_bounds import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parent.parent
# A wide init (std 0.2, as tests/test_hf_export.py) gives peaked attention and logits of a few units:
# greedy continuations vary from token to token and their top-two margins are far above rounding, so
# a wrong FAM position or state changes the tokens. Four steps make the weights trained ones.
TRAINED = dict(model__init_method_std=0.2, train__steps=4, checkpoint__save_interval_steps=0,
               train__eval_interval_steps=0)


def train_tiny(shards: Path, run_dir: Path, **extra) -> Path:
    """A one-process pipeline.train run; returns its last step folder."""
    from pipeline.train import run

    summary = run(load_config(None, tiny_overrides(shards, run_dir, **{**TRAINED, **extra})))
    return Path(summary["last_checkpoint"])


def run_command(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_SECONDS)


def run_in_process(module: str, args: list, capsys) -> subprocess.CompletedProcess:
    """`python -m module args` as its `main(argv)` in this process: the exit status and what it
    printed, as run_command gives them (argparse's exit included)."""
    argv = [str(a) for a in args]
    capsys.readouterr()
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([module, *argv], code, out, err)


def run_cases(commands: list[tuple[str, list]], capsys) -> list[subprocess.CompletedProcess]:
    """Each (module, args) of a bad-input test: a command's first case as a process of its own (its
    entry point, and that nothing else reaches stderr; all such started at once), its further cases
    as its `main` in this process (run_in_process)."""
    first: dict[str, int] = {}
    for i, (module, _) in enumerate(commands):
        first.setdefault(module, i)
    spawned = dict(zip(first.values(), run_commands([commands[i] for i in first.values()])))
    return [spawned[i] if i in spawned else run_in_process(module, args, capsys)
            for i, (module, args) in enumerate(commands)]


def run_commands(commands: list[tuple[str, list]], cwd: Path = ROOT) -> list[subprocess.CompletedProcess]:
    """run_command for each (module, args), all started at once: each spends its seconds importing
    torch in one thread, so together they use every core instead of one after the other."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argvs = [[sys.executable, "-m", module, *map(str, args)] for module, args in commands]
    procs = [subprocess.Popen(argv, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for argv in argvs]
    try:
        outputs = [proc.communicate(timeout=HANG_GUARD_SECONDS) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # no-op for those that ended; a hung one must not outlive the test
    return [subprocess.CompletedProcess(argv, proc.returncode, out, err)
            for argv, proc, (out, err) in zip(argvs, procs, outputs)]


def one_line_error(result: subprocess.CompletedProcess, module: str) -> str:
    """The single stderr line of a refused command (exit 2, no traceback); fails otherwise."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"python -m {module}: error: "), lines[0]
    return lines[0]


def copy_step(step: Path, dest: Path) -> Path:
    shutil.copytree(step, dest)
    return dest


def rewrite_file(step: Path, name: str, content: bytes) -> None:
    """Replace one file of a step folder and its sha256 in the manifest: a complete checkpoint again."""
    (step / name).write_bytes(content)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(content).hexdigest()
    (step / "manifest.json").write_text(json.dumps(manifest))


def edit_model_config(step: Path, **changes) -> None:
    config = yaml.safe_load((step / "config.yaml").read_text())
    config["model"].update(changes)
    rewrite_file(step, "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
