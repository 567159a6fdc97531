"""MLflow tracking against real stores: a local SQLite file and a real `mlflow server` on
loopback (tests/conftest.py). Checks params, buffered metrics, tags, the config artifact, the
summary and the loss-curve image, that a resumed training continues the same run, that after a
kill -9 and a resume each metric has every step exactly once, and that a rerun of a finished run
changes nothing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config.load import load_config
from pipeline.training.tracking import Tracker, build_loss_curve
from pipeline.train import run
from tests.conftest import ROOT, tiny_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _assert_artifacts(client: MlflowClient, run_id: str, tmp_path: Path) -> None:
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "loss_curve.png"} <= names, names
    local = Path(client.download_artifacts(run_id, "loss_curve.png", str(tmp_path)))
    assert local.read_bytes()[:8] == PNG_MAGIC and local.stat().st_size > 5000
    config = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "num_layers: 2" in config and "rsp_probability: 0.8" in config


def test_metrics_are_buffered_until_flush(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"--tracking.tracking_uri={uri}", "--tracking.flush_interval_steps=4", "--tracking.experiment=unit"])
    tracker = Tracker(cfg.tracking)
    run_id = tracker.start({"a.b": 1, "c.d": [0.9, 0.95]}, {"host": "test"})
    client = MlflowClient(uri)
    for step in (1, 2, 3):
        tracker.log_metrics(step, {"loss": 5.0 - step, "mfu": None})
        tracker.maybe_flush(step)
    assert client.get_metric_history(run_id, "loss") == []  # nothing sent before the flush interval
    tracker.log_metrics(4, {"loss": 1.0})
    tracker.maybe_flush(4)
    assert _metric_steps(client, run_id, "loss") == [1, 2, 3, 4]
    assert client.get_metric_history(run_id, "mfu") == []  # n/a values are not logged
    tracker.finish()
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.params == {"a.b": "1", "c.d": "[0.9, 0.95]"}
    assert run_id in tracker.describe() and f"mlflow ui --backend-store-uri {uri}" in tracker.describe()


def test_disabled_or_non_rank0_tracker_does_nothing(tmp_path):
    cfg = load_config(None, [f"--tracking.tracking_uri=sqlite:///{tmp_path / 'x.db'}"])
    for tracker in (Tracker(cfg.tracking, active=False), Tracker(load_config(None, ["--tracking.enabled=false"]).tracking)):
        assert tracker.start({"a": 1}, {}) is None
        tracker.log_metrics(1, {"loss": 1.0})
        tracker.flush()
        tracker.finish()
    assert not (tmp_path / "x.db").exists()


def test_loss_curve_is_a_png(tmp_path):
    path = build_loss_curve({"loss": [(1, 5.0), (2, 4.0)], "val_loss": [(2, 4.2)], "lr": [(1, 1e-3), (2, 5e-4)]},
                            tmp_path / "curve.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert build_loss_curve({"loss": []}, tmp_path / "none.png") is None


def test_training_logs_to_a_local_sqlite_store(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run(load_config(None, tiny_overrides(shards, tmp_path / "run", tracking__enabled=True,
                                                   tracking__tracking_uri=uri, tracking__flush_interval_steps=2)))
    client = MlflowClient(uri)
    data = client.get_run(summary["mlflow_run_id"]).data
    assert data.params["model.num_layers"] == "2" and data.params["optim.grad_clip"] == "1.0"
    assert data.params["data.global_batch_size"] == "4" and len(data.params) > 50
    assert data.tags["slurm.job_id"] == "4242" and data.tags["world_size"] == "1" and "host" in data.tags
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert _metric_steps(client, summary["mlflow_run_id"], key) == [1, 2, 3, 4, 5, 6], key
    assert _metric_steps(client, summary["mlflow_run_id"], "val_loss") == [3, 6]
    assert "mfu" not in data.metrics  # n/a on CPU without train.peak_tflops
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    _assert_artifacts(client, summary["mlflow_run_id"], tmp_path / "download")


def test_resumed_training_continues_the_same_run_on_an_mlflow_server(shards, tmp_path, mlflow_server):
    args = dict(tracking__enabled=True, tracking__tracking_uri=mlflow_server, tracking__experiment="server-test",
                train__peak_tflops=0.001)
    first = run(load_config(None, tiny_overrides(shards, tmp_path / "run", train__exit_after_steps=3, **args)))
    client = MlflowClient(mlflow_server)
    assert client.get_run(first["mlflow_run_id"]).info.status == "KILLED"
    second = run(load_config(None, tiny_overrides(shards, tmp_path / "run", **args)))
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    run_id = second["mlflow_run_id"]
    assert _metric_steps(client, run_id, "loss") == [1, 2, 3, 4, 5, 6]
    assert _metric_steps(client, run_id, "mfu") == [1, 2, 3, 4, 5, 6]  # peak given: MFU is logged
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["resumed_from_step"] == "3"
    _assert_artifacts(client, run_id, tmp_path / "download")


# ---------------------------------------------------------------- after a crash: every step once


def _read_steps_until(fifo: Path, last_step: int, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Read the trainer's sample-key records from a FIFO, one step at a time, up to `last_step`.
    SampleKeyRecorder opens its file anew at the end of every step, and opening a FIFO for
    writing blocks until a reader opens it: after the last record read here, the trainer is held
    at the end of step last_step + 1, before that step's metrics, flush or checkpoint."""
    step = 0
    while step < last_step:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(fifo.read_text()), daemon=True)
        reader.start()
        while reader.is_alive():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"step {step + 1} not reached: {log.read_text()[-3000:]}"
            reader.join(0.2)
        step = json.loads(box[0])["step"]


def _kill_after(shards: Path, run_dir: Path, extra: dict, last_step: int, tmp_path: Path) -> None:
    """`python -m pipeline.train` in a subprocess, killed with SIGKILL once step `last_step` is done."""
    keys = tmp_path / "keys"
    keys.mkdir()
    fifo = keys / "keys_r00000.jsonl"
    os.mkfifo(fifo)
    log = tmp_path / "killed.log"
    args = tiny_overrides(shards, run_dir, train__record_sample_keys=keys, **extra)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, stdout=out, stderr=out)
    try:
        # A guard against a hang, not a timed claim: 20 tiny steps take seconds; 10 minutes allows a busy machine.
        _read_steps_until(fifo, last_step, proc, log, time.monotonic() + 600)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        with contextlib.suppress(OSError):  # release a reader thread still waiting in open()
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("flush, save, killed_after, steps", [
    (10, 5, 19, 24),  # the trial: checkpoint 15 is newer than the last flush (10); steps 11-15 were lost
    (4, 6, 10, 14),  # a flush (8) newer than the checkpoint resumed from (6): steps 7-8 would come twice
])
def test_after_kill_9_and_resume_mlflow_has_every_step_exactly_once(shards, tmp_path, flush, save, killed_after, steps):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = dict(tracking__enabled=True, tracking__tracking_uri=uri, tracking__flush_interval_steps=flush,
                 checkpoint__save_interval_steps=save, checkpoint__keep_last=3, train__steps=steps,
                 train__eval_interval_steps=5, train__peak_tflops=0.001)
    _kill_after(shards, tmp_path / "run", extra, killed_after, tmp_path)
    summary = run(load_config(None, tiny_overrides(shards, tmp_path / "run", **extra)))
    assert summary["status"] == "FINISHED" and summary["step"] == steps
    assert summary["losses"][0][0] == killed_after // save * save + 1  # it resumed from the last checkpoint
    client = MlflowClient(uri)
    every = list(range(1, steps + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        history = client.get_metric_history(summary["mlflow_run_id"], key)
        assert sorted(m.step for m in history) == every, key  # sorted, not deduplicated: a repeat shows
    assert _metric_steps(client, summary["mlflow_run_id"], "val_loss") == [s for s in every if s % 5 == 0 or s == steps]


# ---------------------------------------------------------------- a finished run stays as it was


def _record(client: MlflowClient, run_id: str, run_dir: Path, download: Path) -> dict:
    """Everything a rerun could change: run_dir's files, the MLflow run's params, tags, status,
    end time, metric histories and artifacts (their bytes)."""
    mlflow_run = client.get_run(run_id)
    download.mkdir()
    return {
        "files": {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()},
        "params": mlflow_run.data.params, "tags": mlflow_run.data.tags,
        "status": (mlflow_run.info.status, mlflow_run.info.end_time),
        "metrics": {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
                    for key in mlflow_run.data.metrics},
        "artifacts": {a.path: Path(client.download_artifacts(run_id, a.path, str(download))).read_bytes()
                      for a in client.list_artifacts(run_id)},
    }


@contextlib.contextmanager
def _famtron_lines():
    """The messages of the `famtron` logger (which does not propagate to pytest's caplog)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("famtron").addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger("famtron").removeHandler(handler)


def test_a_rerun_of_a_finished_run_changes_nothing_and_a_changed_config_is_refused(shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = dict(tracking__enabled=True, tracking__tracking_uri=uri, train__steps=4)
    first = run(load_config(None, tiny_overrides(shards, tmp_path / "run", **extra)))
    client = MlflowClient(uri)
    before = _record(client, first["mlflow_run_id"], tmp_path / "run", tmp_path / "before")
    assert json.loads(before["files"]["summary.json"])["losses"]  # what the old rerun emptied

    with _famtron_lines() as lines:  # `make demo` twice: the same command again
        again = run(load_config(None, tiny_overrides(shards, tmp_path / "run", **extra)))
    assert len(lines) == 1 and "is finished" in lines[0] and "nothing to train, nothing changed" in lines[0], lines
    assert again == json.loads(before["files"]["summary.json"])
    # A safe key changed (fewer steps) also trains nothing.
    run(load_config(None, tiny_overrides(shards, tmp_path / "run", **{**extra, "train__steps": 3})))
    assert _record(client, first["mlflow_run_id"], tmp_path / "run", tmp_path / "after") == before

    with pytest.raises(ValueError, match=r"optim.lr 0.003 -> 0.001, optim.warmup_steps 2 -> 1\. .*give a new "
                                         r"train.run_dir \(or checkpoint.dir\)"):
        run(load_config(None, tiny_overrides(shards, tmp_path / "run", **extra, optim__lr=1e-3, optim__warmup_steps=1)))
    assert _record(client, first["mlflow_run_id"], tmp_path / "run", tmp_path / "refused") == before
