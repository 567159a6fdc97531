"""MLflow tracking from rank 0: params, buffered metrics, artifacts, run location.

Metrics are buffered and sent with one `MlflowClient.log_batch` call every
`tracking.flush_interval_steps` steps, before every checkpoint save and at the end (also of a run
that stopped or raised): a synchronous `log_metric` per value costs about 12 ms against a server
(research/dependencies.md §5). Every other rank, and `tracking.enabled=false`, gets the same
object with every method a no-op, so the training loop has no branches.

A resumed run continues the same MLflow run when its id is known, and each metric keeps one point
per step: flushing before each save means every step up to the checkpoint is in MLflow, and the
points a flush sent after it (steps the resumed run computes again) are not sent twice: `start`
reads each metric's last logged step and `log_metrics` drops points at or before it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.config.tree import TrackingConfig

log = logging.getLogger("famtron")

SLURM_TAGS = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_TASK_ID": "slurm.array_task_id", "SLURM_JOB_NODELIST": "slurm.nodelist"}
_MAX_METRICS_PER_BATCH, _MAX_PARAMS_PER_BATCH = 1000, 100  # MLflow's log_batch limits


def build_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Where the run ran: host, git commit, Slurm job (when present), plus `extra`."""
    tags = {"host": socket.gethostname()}
    tags.update({name: os.environ[var] for var, name in SLURM_TAGS.items() if os.environ.get(var)})
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip()
        if commit:
            tags["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout: the tag is simply absent
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


class Tracker:
    def __init__(self, cfg: TrackingConfig, active: bool = True):
        self.cfg = cfg
        self.active = active and cfg.enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: Any = None
        self._buffer: list[Any] = []
        self._logged_through: dict[str, int] = {}  # a resumed run: each metric's last step already in MLflow
        self.history: dict[str, list[tuple[int, float]]] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self, params: dict[str, Any], tags: dict[str, str], resume_run_id: str | None = None) -> str | None:
        """Create the run (or reopen `resume_run_id`); logs params only for a new run, since
        MLflow params are immutable and a resumed run already has them."""
        if not self.active:
            return None
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        self.experiment_id = self._experiment_id()
        if resume_run_id and self._run_exists(resume_run_id):
            self.run_id = resume_run_id
            self._logged_through = self._last_logged_steps()
            self._client.update_run(self.run_id, status="RUNNING")
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            return self.run_id
        run = self._client.create_run(self.experiment_id, run_name=self.cfg.run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])
        return self.run_id

    def _experiment_id(self) -> str:
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        uri = self.cfg.tracking_uri or ""
        if uri.startswith("sqlite:///"):
            # Keep artifacts beside the database rather than in whatever cwd created the experiment.
            artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
        try:
            return self._client.create_experiment(self.cfg.experiment, artifact_location=artifact_location)
        except Exception:  # another job created it between our lookup and create
            exp = self._client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _last_logged_steps(self) -> dict[str, int]:
        """{metric: its largest logged step} of the reopened run."""
        keys = self._client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self._client.get_metric_history(self.run_id, key)) for key in keys}

    def _run_exists(self, run_id: str) -> bool:
        try:
            return self._client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # unknown id in this store (e.g. another tracking URI)
            log.warning("MLflow run %s not found at %s; starting a new run", run_id, self.cfg.tracking_uri)
            return False

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active or self.run_id is None:
            return
        self.flush()
        self._client.set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------ logging

    def log_metrics(self, step: int, metrics: dict[str, float | None]) -> None:
        """Buffer; n/a values (None, e.g. MFU on CPU) and steps already logged before a resume
        are skipped (a resume from an older checkpoint than the newest: the first values stand)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None or step <= self._logged_through.get(key, -1):
                continue
            self._buffer.append(Metric(key, float(value), now, step))
            self.history.setdefault(key, []).append((step, float(value)))

    def maybe_flush(self, step: int) -> None:
        if step % self.cfg.flush_interval_steps == 0:
            self.flush()

    def flush(self) -> None:
        if not self.active or not self._buffer:
            return
        for i in range(0, len(self._buffer), _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=self._buffer[i : i + _MAX_METRICS_PER_BATCH])
        self._buffer = []

    def log_artifact(self, path: str | Path) -> None:
        if self.active:
            self._client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def full_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric over the whole run, including before a resume."""
        if not self.active:
            return []
        self.flush()
        return sorted((m.step, m.value) for m in self._client.get_metric_history(self.run_id, key))

    def describe(self) -> str:
        """Where to find the run, for the console."""
        if not self.active:
            return "MLflow tracking is off (tracking.enabled=false)"
        uri = self.cfg.tracking_uri
        if uri.startswith("http"):
            where = f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        else:
            where = f"mlflow ui --backend-store-uri {uri}"
        return f"MLflow run {self.run_id} (experiment {self.cfg.experiment!r}) at {uri}; view: {where}"


def build_loss_curve(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path | None:
    """PNG of train/validation loss (left) and learning rate (right) against step."""
    if not history.get("loss"):
        return None
    try:
        import matplotlib
    except ImportError:  # e.g. a bare GPU image: the metrics are still in MLflow and summary.json
        log.warning("matplotlib is not installed; no loss-curve image")
        return None

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, style in (("loss", "train", "-"), ("val_loss", "validation", "o--")):
        if history.get(key):
            steps, values = zip(*history[key])
            ax_loss.plot(steps, values, style, label=label)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title or "loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    if history.get("lr"):
        steps, values = zip(*history["lr"])
        ax_lr.plot(steps, values)
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
