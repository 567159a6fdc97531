"""The Slurm launchers against real Slurm 22.05 daemons (tests/slurm_cluster.py: slurmctld and
two slurmd "nodes" n1/n2 on loopback), the real trainer on CPU/gloo, real shards and a real
MLflow server.

One uninterrupted two-node run (`reference`) is the yardstick: a run stopped by USR1 and
requeued, and a run whose rank was SIGKILLed and which was resubmitted, must train on exactly
its samples, step by step (the trainer records each step's sample keys per rank), and the
requeued one must reproduce its losses and weights bitwise (CPU, same reduction order).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.checkpointing.files import list_checkpoints, load_file
from pipeline.training.fault import read_sample_keys
from tests.conftest import ROOT, _write_corpus, tiny_overrides
from tests.slurm_cluster import GPU_PARTITION, KILL_WAIT_SECONDS, slurm_cluster  # noqa: F401  (session fixture)
from tests.time_bounds import HANG_GUARD_SECONDS, LOAD_MARGIN_SECONDS
from tests.trained_checkpoints import run_in_process

STEPS, SAVE_EVERY = 100, 10  # ~50 ms a step on 2 idle cores; the interrupted runs freeze their ranks to signal them


def _train_args(shards: Path, run_dir: Path, **extra) -> list[str]:
    values = dict(train__steps=STEPS, checkpoint__save_interval_steps=SAVE_EVERY, checkpoint__keep_last=3,
                  train__eval_interval_steps=0, train__record_sample_keys=run_dir / "keys")
    values.update(extra)
    return ["--config", "tiny", *tiny_overrides(shards, run_dir, **values)]


def _env(cluster, log_dir: Path) -> dict[str, str]:
    # The job inherits this (sbatch --export=ALL): our interpreter, our log folder.
    return dict(cluster.env, FAMTRON_PYTHON=sys.executable, FAMTRON_LOG_DIR=str(log_dir))


def _sbatch_train(cluster, args: list[str], log_dir: Path) -> int:
    """`sbatch -N 2 slurm/train.sbatch ARGS`, its Slurm output file in log_dir (not the repo)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return cluster.sbatch(["-N", "2", f"--output={log_dir}/%x-%j.out", "slurm/train.sbatch", *args],
                          env=_env(cluster, log_dir))


def _job_logs(log_dir: Path, job: int, tail_chars: int | None = 4000) -> str:
    """The job's batch and node logs (the tail of each by default, for failure messages)."""
    parts = []
    for path in sorted((log_dir / str(job)).glob("*.log")):
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail_chars if tail_chars else 0:]}")
    return "\n".join(parts) or f"(no logs in {log_dir / str(job)})"


def _finished(cluster, job: int, log_dir: Path) -> dict[str, str]:
    info = cluster.wait_job(job, HANG_GUARD_SECONDS)
    why = f"job {job}: {info['JobState']} exit {info.get('ExitCode')}\n{_job_logs(log_dir, job)}"
    assert info["JobState"] == "COMPLETED", why
    return info


def _wait_for_step(cluster, job: int, keys_file: Path, step: int, log_dir: Path) -> tuple[int, float]:
    """Poll the rank's sample-key record until it has `step` steps; returns that rank's PID and
    the longest time seen between two of its records (an upper bound on one step, poll included)."""
    deadline = time.time() + HANG_GUARD_SECONDS
    count, last_change, slowest = 0, None, 0.0
    while time.time() < deadline:
        lines = keys_file.read_text().splitlines() if keys_file.exists() else []
        if len(lines) > count:
            now = time.time()
            slowest = max(slowest, now - last_change) if last_change is not None else slowest
            count, last_change = len(lines), now
        if count >= step:
            return json.loads(lines[-1])["pid"], slowest
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} ended ({state})\n{_job_logs(log_dir, job)}"
        time.sleep(0.1)
    raise TimeoutError(f"job {job} did not reach step {step} in {HANG_GUARD_SECONDS} s\n{_job_logs(log_dir, job)}")


def _pending_signals(pid: int) -> int:
    """The process's pending-signal mask (process-wide and its main thread's) from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)


def _wait_until_pending(pids: list[int], sig: signal.Signals, job: int, log_dir: Path) -> None:
    """Wait (a hang guard only) until one of the stopped processes has `sig` pending: one rank
    is enough, as the trainer's ranks agree on stopping (StopRequest.agreed). (In the test
    cluster a job signal has been seen to reach one node's step long before the other's.)"""
    bit = 1 << (sig - 1)
    deadline = time.time() + HANG_GUARD_SECONDS
    while not any(_pending_signals(pid) & bit for pid in pids):
        assert time.time() < deadline, f"{sig.name} did not reach {pids} in {HANG_GUARD_SECONDS} s\n" \
                                       f"{_job_logs(log_dir, job)}"
        time.sleep(0.1)


def _params(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = load_file(checkpoint, "model_tp00.pt")["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _steps_keys(keys_dir: Path) -> dict[int, dict[int, list[str]]]:
    """{rank: {step: keys}}, checking that a step run twice (redone after a resume) drew the
    same samples both times."""
    out = {}
    for rank, steps in read_sample_keys(keys_dir).items():
        for step, runs in steps.items():
            assert all(r == runs[0] for r in runs), f"rank {rank} step {step} drew other samples when redone: {runs}"
        out[rank] = {step: runs[0] for step, runs in steps.items()}
    return out


# ---------------------------------------------------------------- training jobs


@pytest.fixture(scope="module")
def reference(slurm_cluster, shards, mlflow_server, tmp_path_factory):  # noqa: F811
    """An uninterrupted `sbatch -N 2 slurm/train.sbatch` run: 2 nodes x 1 process, gloo."""
    root = tmp_path_factory.mktemp("reference")
    log_dir, run_dir = root / "logs", root / "run"
    args = _train_args(shards, run_dir, tracking__enabled=True, tracking__tracking_uri=mlflow_server,
                       tracking__experiment="slurm")
    started = time.time()
    job = _sbatch_train(slurm_cluster, args, log_dir)
    info = _finished(slurm_cluster, job, log_dir)
    return {"job": job, "info": info, "run_dir": run_dir, "log_dir": log_dir, "seconds": time.time() - started,
            "summary": json.loads((run_dir / "summary.json").read_text()), "keys": _steps_keys(run_dir / "keys")}


def test_two_node_job_trains_checkpoints_and_tags_its_mlflow_run(reference, mlflow_server):
    from mlflow.tracking import MlflowClient

    job, summary = reference["job"], reference["summary"]
    assert reference["info"]["NodeList"] == "n[1-2]" and reference["info"]["NumNodes"] == "2"
    assert summary["status"] == "FINISHED" and summary["step"] == STEPS
    assert summary["final_loss"] < summary["first_loss"]
    ckpt = reference["run_dir"] / "checkpoints" / f"step_{STEPS:08d}"
    assert {"loader_dp000.pt", "loader_dp001.pt", "rng_r00001.pt"} <= {p.name for p in ckpt.iterdir()}  # DP=2
    # One torchrun per node, each with one worker (torchrun's per-node rank folders), and rank 0's
    # lines in one node's log only. (Rank 1 prints nothing when third-party warnings are quiet.)
    job_dir = reference["log_dir"] / str(job)
    workers = {n: sorted(p.name for p in (job_dir / "ranks" / "attempt0" / f"node{n}").glob("*/attempt_0/*"))
               for n in (0, 1)}
    assert workers == {0: ["0"], 1: ["0"]}, workers
    node_logs = [(job_dir / f"node-{n}.log").read_text() for n in (0, 1)]
    assert sorted("[rank0]:" in text for text in node_logs) == [False, True]
    assert not any("[rank1]:" in text and "[rank0]:" in text for text in node_logs)
    assert set(reference["keys"]) == {0, 1} and all(len(steps) == STEPS for steps in reference["keys"].values())
    tags = MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"]).data.tags
    assert tags["slurm.job_id"] == str(job) and tags["slurm.nodelist"] == "n[1-2]", tags
    print(f"two-node reference job: {reference['seconds']:.1f} s")


def _freeze_and_signal(cluster, job: int, run_dir: Path, log_dir: Path, step: int) -> None:
    """What Slurm does at --signal=B:USR1@<s> (signal the batch shell, which tells the trainer),
    with both ranks frozen (SIGSTOP) once past `step` until USR1 is pending in one: the signal
    then lands there however slowly the two `scancel` round trips run on a loaded machine,
    instead of racing the remaining steps."""
    pids = [_wait_for_step(cluster, job, run_dir / "keys" / f"keys_r{rank:05d}.jsonl", step, log_dir)[0]
            for rank in (0, 1)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
        _wait_until_pending(pids, signal.SIGUSR1, job, log_dir)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_usr1_saves_requeues_resumes_and_matches_the_uninterrupted_run(slurm_cluster, reference, shards,  # noqa: F811
                                                                       mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    log_dir, run_dir = tmp_path / "logs", tmp_path / "run"
    args = _train_args(shards, run_dir, tracking__enabled=True, tracking__tracking_uri=mlflow_server,
                       tracking__experiment="slurm")
    started = time.time()
    job = _sbatch_train(slurm_cluster, args, log_dir)
    _freeze_and_signal(slurm_cluster, job, run_dir, log_dir, step=15)
    info = _finished(slurm_cluster, job, log_dir)
    assert info["Restarts"] == "1", info
    job_dir = log_dir / str(job)
    assert (job_dir / "status-attempt0").read_text().strip() == "KILLED"  # stopped early, resumable
    assert (job_dir / "status-attempt1").read_text().strip() == "FINISHED"
    assert "requeueing (stop reason: USR1)" in (job_dir / "batch.log").read_text()
    logs = _job_logs(log_dir, job, tail_chars=None)
    assert "signal 10: stopping after this step" in logs, logs  # SIGUSR1 reached the trainer
    stopped_at = int(re.search(r"resumed from \S+/step_(\d{8})", logs).group(1))
    assert 15 <= stopped_at < STEPS, logs

    # Same samples, same losses, same weights as never having stopped.
    assert _steps_keys(run_dir / "keys") == reference["keys"]
    summary = json.loads((run_dir / "summary.json").read_text())
    history = MlflowClient(mlflow_server).get_metric_history(summary["mlflow_run_id"], "loss")  # both attempts
    losses = sorted((m.step, m.value) for m in history)
    assert losses == [tuple(x) for x in reference["summary"]["losses"]]
    expected = _params(reference["run_dir"] / "checkpoints" / f"step_{STEPS:08d}")
    resumed = _params(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    assert all(torch.equal(value, resumed[name]) for name, value in expected.items())
    print(f"USR1 at step ~15, saved at {stopped_at}, requeued and finished: {time.time() - started:.1f} s")


def _seconds_until_ended(cluster, job: int, since: float, bound: float, log_dir: Path, what: str) -> float:
    """Seconds from `since` until the job FAILED; fails (and cancels the job, so later tests get
    the nodes) once `bound` has passed."""
    try:
        info = cluster.wait_job(job, timeout_seconds=bound - (time.time() - since))
    except TimeoutError:
        cluster.run(["scancel", "--signal=KILL", "--full", str(job)], check=False)
        raise AssertionError(f"job {job} still running {bound:.0f} s after {what}\n{_job_logs(log_dir, job)}") from None
    ended_after = time.time() - since
    assert info["JobState"] == "FAILED", f"{info}\n{_job_logs(log_dir, job)}"
    return ended_after


def test_killed_rank_ends_the_job_in_time_and_a_resubmission_loses_no_sample(
        slurm_cluster, reference, shards, tmp_path):  # noqa: F811
    """SIGKILL of a rank: torchrun on its node sees the worker die and exits, and srun
    (--kill-on-bad-exit) ends the step on the other node, whose rank is SIGKILLed at the latest
    KillWait after srun's SIGTERM. So the job ends within KillWait (+ margin), long before the
    collective timeout (parallel.timeout_seconds, left at its default) could end the peers' wait."""
    from pipeline.config.load import load_config

    collective_timeout = load_config("tiny", []).parallel.timeout_seconds
    bound = KILL_WAIT_SECONDS + LOAD_MARGIN_SECONDS
    assert bound < collective_timeout  # else the timeout, not the launcher, could be what ends the job
    log_dir, run_dir = tmp_path / "logs", tmp_path / "run"
    args = _train_args(shards, run_dir)
    job = _sbatch_train(slurm_cluster, args, log_dir)
    pid, _ = _wait_for_step(slurm_cluster, job, run_dir / "keys" / "keys_r00001.jsonl", 25, log_dir)
    os.kill(pid, signal.SIGKILL)  # rank 1, on whichever node it landed
    ended_after = _seconds_until_ended(slurm_cluster, job, time.time(), bound, log_dir, "the kill of rank 1")
    last_complete = list_checkpoints(run_dir / "checkpoints")[-1][0]
    assert last_complete >= 20

    # Resubmit the same run through slurm.submit (the rendered script): it resumes and finishes.
    submit = subprocess.run([sys.executable, "-m", "slurm.submit", "--nodes", "2", "--gpus-per-node", "0",
                             "--log-dir", str(log_dir), *args], env=_env(slurm_cluster, log_dir), cwd=ROOT,
                            capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert submit.returncode == 0, submit.stderr
    second = int(submit.stderr.split("submitted job ")[1].split(";")[0])
    _finished(slurm_cluster, second, log_dir)
    node_logs = _job_logs(log_dir, second, tail_chars=None)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{last_complete:08d}'}" in node_logs, node_logs
    # Steps after the checkpoint ran twice (killed, then redone) with the same samples; overall
    # every step trained on exactly the reference's samples: none lost, none repeated.
    assert _steps_keys(run_dir / "keys") == reference["keys"]
    print(f"SIGKILL of rank 1 ended job {job} in {ended_after:.1f} s (bound {bound:.0f} s, collective timeout "
          f"{collective_timeout:.0f} s); resubmission resumed from step {last_complete}")


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(slurm_cluster, shards, tmp_path):  # noqa: F811
    """SIGSTOP: the process lives on, so neither torchrun nor srun notices; only the process
    groups' timeout (parallel.timeout_seconds) turns the peers' wait into an error. The peers
    then fail and srun ends the step; a stopped process ignores SIGTERM, so it goes at Slurm's
    SIGKILL after KillWait: the job ends within timeout + KillWait (+ margin), and not before the
    timeout less one step (the peer's wait may have begun up to a step before the stop)."""
    log_dir, run_dir = tmp_path / "logs", tmp_path / "run"
    timeout = 8
    bound = timeout + KILL_WAIT_SECONDS + LOAD_MARGIN_SECONDS
    args = _train_args(shards, run_dir, parallel__timeout_seconds=timeout, train__steps=100000,
                       checkpoint__save_interval_steps=0)
    job = _sbatch_train(slurm_cluster, args, log_dir)
    pid, step_seconds = _wait_for_step(slurm_cluster, job, run_dir / "keys" / "keys_r00001.jsonl", 10, log_dir)
    os.kill(pid, signal.SIGSTOP)
    ended_after = _seconds_until_ended(slurm_cluster, job, time.time(), bound, log_dir, "rank 1 was stopped")
    assert ended_after >= timeout - step_seconds, f"job ended {ended_after:.1f} s after the hang, before the timeout"
    assert f"Timed out waiting {timeout * 1000}ms" in _job_logs(log_dir, job, tail_chars=None)  # gloo's own words
    print(f"SIGSTOP of rank 1: job {job} failed {ended_after:.1f} s later (timeout {timeout} s, bound {bound:.0f} s)")


# ---------------------------------------------------------------- data preparation


def test_prep_array_of_three_tasks_matches_a_one_process_run(slurm_cluster, tmp_path):  # noqa: F811
    text = tmp_path / "text"
    _write_corpus(text, docs=30)
    common = ["--input", str(text), "--tokenizer", "byte", "--seq-len", "64", "--samples-per-shard", "16",
              "--valid-fraction", "0.2", "--group-bytes", "10000"]  # ~4 pack groups: work for 3 tasks
    subprocess.run([sys.executable, "-m", "data_prep.shard", *common, "--output", str(tmp_path / "one"),
                    "--no-progress"], cwd=ROOT, check=True, capture_output=True, timeout=HANG_GUARD_SECONDS)
    env = dict(slurm_cluster.env, FAMTRON_PYTHON=sys.executable)
    out = subprocess.run([sys.executable, "-m", "slurm.prep", "submit", "--tasks", "3",
                          "--log-dir", str(tmp_path / "logs"), "--", *common, "--output", str(tmp_path / "three")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert out.returncode == 0, out.stderr
    array_id, merge_id = out.stdout.split()[2], out.stdout.split()[-3]
    info = slurm_cluster.wait_job(merge_id)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.out")))
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs}"
    assert info["Dependency"] in ("(null)", "") or "afterok" in info["Dependency"]
    task_files = sorted(p.name for p in (tmp_path / "three" / "_state").glob("task-*-of-00003.json"))
    assert len(task_files) == 3, task_files  # each array task did its share
    assert "train:" in logs and ": ok" in logs  # the merge job validated the result
    for split in ("train", "valid"):
        one = json.loads((tmp_path / "one" / split / "manifest.json").read_text())
        three = json.loads((tmp_path / "three" / split / "manifest.json").read_text())
        assert (three["total_samples"], three["total_tokens"]) == (one["total_samples"], one["total_tokens"])
        assert [(s["name"], s["sha256"]) for s in three["shards"]] == [(s["name"], s["sha256"]) for s in one["shards"]]
    print(f"prep: array {array_id} + merge {merge_id}: {one['total_samples']} valid samples")


# ---------------------------------------------------------------- slurm.submit


FAM24B = ["--config", "configs/fam-24b.yaml", "--data.train_manifest=/data/fam/train/manifest.json",
          "--data.seq_len=4096", "--data.micro_batch_size=1", "--data.global_batch_size=64"]


def _submit(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm.submit", *args], env=cluster.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)


@pytest.fixture
def submit_here(slurm_cluster, monkeypatch, capsys):  # noqa: F811
    """_submit as slurm.submit's main in this process, in the cluster's environment: for the checks
    after the first, which runs the entry point (a process spends ~9 s on its imports)."""
    for name, value in slurm_cluster.env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    return lambda *args: run_in_process("slurm.submit", list(args), capsys)


def test_fam24b_on_8_nodes_of_8_gpus_renders_a_script_sbatch_test_only_accepts(slurm_cluster, tmp_path):  # noqa: F811
    out = _submit(slurm_cluster, "--nodes", "8", "--gpus-per-node", "8", "--partition", GPU_PARTITION,
                  "--time", "2-00:00:00", "--account", "llm", "--dry-run", *FAM24B)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64",
                 f"#SBATCH --partition={GPU_PARTITION}", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 "export FAMTRON_NPROC_PER_NODE=8", "export NCCL_NVLS_ENABLE=0"):
        assert line in script, line
    assert "--data.seq_len=4096" in script and "--max-restarts=0" in script
    test = slurm_cluster.run(["sbatch", "--test-only"], input=script, check=False)
    assert test.returncode == 0, test.stderr
    assert "g[01-08]" in test.stderr and f"partition {GPU_PARTITION}" in test.stderr, test.stderr
    # The check means something: one node more than the partition has is refused.
    too_big = slurm_cluster.run(["sbatch", "--test-only"], input=script.replace("--nodes=8", "--nodes=9"), check=False)
    assert too_big.returncode != 0 and "not available" in too_big.stderr


def test_submit_names_the_numbers_when_the_shape_does_not_fit_the_parallel_sizes(submit_here):
    out = submit_here("--nodes", "3", "--gpus-per-node", "1", "--dry-run", "--config", "tiny",
                      "--data.train_manifest=x", "--data.seq_len=128", "--parallel.tensor_parallel_size=2")
    assert out.returncode == 2 and out.stdout == ""
    assert "3 processes cannot be split as parallel.tensor_parallel_size=2" in out.stderr, out.stderr
    assert "not a multiple of TP x PP = 2" in out.stderr
    batch = submit_here("--nodes", "2", "--gpus-per-node", "8", "--dry-run", *FAM24B[:-1],
                        "--data.global_batch_size=24")
    assert batch.returncode == 2 and "16 processes" in batch.stderr and "data.global_batch_size=24" in batch.stderr


def test_submit_reports_a_missing_config_and_passes_sbatch_errors_through(submit_here, tmp_path):
    missing = submit_here("--nodes", "1", "--gpus-per-node", "0", "--config", "configs/nope.yaml")
    assert missing.returncode == 2 and "unknown config 'configs/nope.yaml'" in missing.stderr, missing.stderr
    rejected = submit_here("--nodes", "2", "--gpus-per-node", "0", "--partition", "nopart",
                           "--log-dir", str(tmp_path), "--config", "tiny", "--data.train_manifest=x", "--data.seq_len=128")
    assert rejected.returncode != 0
    assert "sbatch rejected the job" in rejected.stderr and "invalid partition specified: nopart" in rejected.stderr


@pytest.mark.parametrize("limit, seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("2-00:00:00", 172800),
                                            ("1-12", 129600), ("1-0:30", 88200), ("UNLIMITED", None)])
def test_slurm_time_limits_are_read_in_all_of_slurms_formats(limit, seconds):
    from slurm.submit import time_limit_seconds

    assert time_limit_seconds(limit) == seconds


def test_submit_refuses_a_requeue_warning_longer_than_the_time_limit():
    from pipeline.config.load import load_config
    from slurm.submit import JobShape, check_shape

    cfg = load_config("tiny", ["--data.train_manifest=x", "--data.seq_len=128"])
    check_shape(cfg, JobShape(2, 0, 1, time="00:05:00", signal_seconds=120))
    with pytest.raises(ValueError, match=r"--signal-seconds 300 must be less than --time 00:05:00 \(300 s\)"):
        check_shape(cfg, JobShape(2, 0, 1, time="00:05:00", signal_seconds=300))
