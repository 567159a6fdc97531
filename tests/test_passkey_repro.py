"""The PassKey reproduction driver (benchmarks/passkey_repro.py) end to end at its --tiny size on CPU:
the same stages, recipes and commands as the GPU run (data prep, both trainings with their in-loop
evaluation, the report), so the GPU run cannot fail on a typo; a second invocation trains nothing
and reports the same numbers; --report redraws the pictures from summary.json alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_driver(root: Path, *args: str) -> subprocess.CompletedProcess:
    # One thread per process: the evaluation decodes token by token (tests/test_generate.py).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "benchmarks.passkey_repro", "--tiny", "--root", str(root), *args,
               "--", f"--tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_the_tiny_reproduction_runs_every_stage_and_reports_both_models(tmp_path):
    done = run_driver(tmp_path)
    out = tmp_path / "runs" / "passkey-repro-tiny" / "report"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"fam", "bswa"}
    for model, s in summary.items():
        assert s["step"] == 3 and s["train"]["status"] == "FINISHED", s
        assert [(c["length"], c["depth"]) for c in s["passkey"]["cells"]] == [(256, 0.0), (256, 1.0), (1024, 0.0),
                                                                            (1024, 1.0)]
        assert len(s["position_loss"]["buckets"]) == 6 and s["position_loss"]["receptive_field"] == 2 * 16
        for name in ("passkey_heatmap.png", "position_loss.png", "passkey.json"):
            assert (out / f"{model}_{name}").is_file(), name
    assert summary["fam"]["passkey"]["cells"][0]["examples"][0]["key"].isdigit()
    table = (out / "summary.md").read_text()
    assert "| fam | 3 | FINISHED |" in table and "| bswa | 3 | FINISHED |" in table and "| 1,024 tokens |" in table
    assert (out / "position_loss_fam_vs_bswa.png").read_bytes()[:8] == PNG_MAGIC
    assert "concurrently" not in done.stdout  # no GPU here: one after the other

    again = run_driver(tmp_path)  # data and both runs are there: nothing is trained again
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "is finished" in (out / "train_fam.log").read_text()
    assert json.loads((out / "summary.json").read_text()) == summary

    (out / "position_loss_fam_vs_bswa.png").unlink()
    for model in summary:
        (out / f"{model}_passkey_heatmap.png").unlink()
    redraw = subprocess.run([sys.executable, "-m", "benchmarks.passkey_repro", "--report", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert (out / "position_loss_fam_vs_bswa.png").read_bytes()[:8] == PNG_MAGIC
    assert all((out / f"{model}_passkey_heatmap.png").is_file() for model in summary)
