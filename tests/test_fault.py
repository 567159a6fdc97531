"""pipeline/training/fault.py on its own: stop requests from real signals and the wall budget, the
non-finite guard, sample-key records, and finite collective timeouts on real gloo groups.
The same pieces under real Slurm daemons are in tests/test_slurm.py."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from pipeline.training.fault import (NonFiniteGuard, SampleKeyRecorder, StopRequest, WallBudget, read_sample_keys,
                            write_status)
from tests.spawn import run_on_ranks


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_stop_signals_are_recorded_and_handlers_restored(sig):
    before = signal.getsignal(sig)
    with StopRequest() as stop:
        assert not stop.stop
        os.kill(os.getpid(), sig)  # delivered to the main thread before kill() returns
        assert stop.stop and stop.reason == signal.Signals(sig).name
        assert stop.agreed(torch.device("cpu"))  # one process: its own flag
    assert signal.getsignal(sig) == before


def test_second_sigint_aborts():
    with StopRequest():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_wall_budget_stops_when_a_step_and_a_save_no_longer_fit():
    budget = WallBudget(100.0, start=time.monotonic() - 80.0)  # 20 s left
    assert not budget.exhausted(step_seconds=2.0, save_seconds=3.0)  # margin 2 x (2 + 3) = 10 s
    assert budget.exhausted(step_seconds=2.0, save_seconds=9.0)  # margin 22 s
    assert budget.exhausted(step_seconds=0.1, save_seconds=0.1)  # the slowest seen is kept
    assert not WallBudget(None).exhausted(1e9, 1e9)
    with StopRequest(max_wall_seconds=1.0) as stop:
        stop.budget.start -= 5.0
        stop.check_budget(0.1, 0.1)
        assert stop.reason == "max_wall_seconds"


def test_nonfinite_guard_skips_counts_and_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard(max_consecutive=2)
    assert not guard.should_skip(1, 2.5, 1.0)
    assert guard.should_skip(2, float("nan"), 1.0)
    assert guard.should_skip(3, 2.4, float("inf"))  # a finite loss with an infinite gradient norm
    assert not guard.should_skip(4, 2.3, 1.0) and guard.consecutive == 0 and guard.skipped == 2
    guard.should_skip(5, float("nan"), 1.0)
    guard.should_skip(6, float("nan"), 1.0)
    with pytest.raises(FloatingPointError, match=r"3 non-finite steps in a row.*train.max_nonfinite_steps=2"):
        guard.should_skip(7, float("inf"), float("nan"))


def test_sample_keys_are_recorded_per_rank_and_step(tmp_path):
    for rank in (0, 1):
        recorder = SampleKeyRecorder(str(tmp_path), rank)
        for step in (1, 2):
            recorder.add([f"r{rank}s{step}a"])
            recorder.add([f"r{rank}s{step}b"])
            recorder.step_done(step)
    SampleKeyRecorder(str(tmp_path), 1).step_done(2)  # a redone step is kept as a second record
    keys = read_sample_keys(tmp_path)
    assert keys[0] == {1: [["r0s1a", "r0s1b"]], 2: [["r0s2a", "r0s2b"]]}
    assert keys[1][2] == [["r1s2a", "r1s2b"], []]
    SampleKeyRecorder(None, 0).step_done(1)  # off: writes nothing


def test_status_file_is_written_only_when_the_launcher_asks(tmp_path, monkeypatch):
    monkeypatch.delenv("FAMTRON_STATUS_FILE", raising=False)
    write_status("KILLED")
    monkeypatch.setenv("FAMTRON_STATUS_FILE", str(tmp_path / "job" / "status"))
    write_status("KILLED")
    assert (tmp_path / "job" / "status").read_text() == "KILLED\n"


def _hung_peer_worker(rank: int, world_size: int, timeout_seconds: float) -> dict:
    """Rank 1 stops taking part (as if frozen); rank 0's collectives on the default group and
    on megatron's data-parallel group must fail after about `timeout_seconds`."""
    import torch.distributed as dist

    from pipeline.parallel.groups import start_groups

    groups = start_groups(1, 1, "gloo", timeout_seconds, device="cpu")
    out = {}
    if rank == 1:
        time.sleep(2 * timeout_seconds + 4)  # longer than both of rank 0's waits
        return out
    for name, group in (("default", None), ("data_parallel", groups.dp_group)):
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
            out[name] = ("returned", time.monotonic() - started)
        except RuntimeError as err:
            out[name] = (type(err).__name__, time.monotonic() - started)
    return out


def test_collectives_time_out_instead_of_hanging_on_a_silent_peer():
    """The default of 30 minutes would hang this test; 3 s must end each wait in 3-10 s."""
    result = run_on_ranks(_hung_peer_worker, 2, 3.0, timeout_seconds=120)[0]
    for group in ("default", "data_parallel"):
        outcome, seconds = result[group]
        assert outcome != "returned" and 2.5 <= seconds <= 10.0, (group, result)


# ---------------------------------------------------------------- in the real training loop


def _poison_forward(monkeypatch, calls: set[int]) -> None:
    """Make the model's n-th training forward (counting micro-batches from 1) return a NaN loss,
    as an fp overflow would; the gradients of that micro-batch become NaN too."""
    import pipeline.training.plain_step as train_module

    real_build = train_module.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        forward, count = model.forward, [0]

        def poisoned(*f_args, **f_kwargs):
            out = forward(*f_args, **f_kwargs)
            if model.training:
                count[0] += 1
                if count[0] in calls:
                    out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(train_module, "build_model", build)


def _train(shards, run_dir, **extra) -> dict:
    from pipeline.config.load import load_config
    from pipeline.train import run
    from tests.conftest import tiny_overrides

    return run(load_config(None, tiny_overrides(shards, run_dir, **extra)))


def test_a_nan_step_is_skipped_counted_and_training_goes_on(shards, tmp_path, monkeypatch):
    from pipeline.checkpointing.files import load_file

    _poison_forward(monkeypatch, {5})  # accumulation 2: micro-batch 5 is step 3's first
    summary = _train(shards, tmp_path / "run", train__max_nonfinite_steps=1)
    assert summary["status"] == "FINISHED" and summary["step"] == 6 and summary["skipped_steps"] == 1
    assert [step for step, _ in summary["losses"]] == [1, 2, 4, 5, 6]  # step 3 is not in the means
    assert all(torch.isfinite(torch.tensor([loss for _, loss in summary["losses"]])))
    weights = load_file(summary["last_checkpoint"], "model_tp00.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if isinstance(v, torch.Tensor))


def test_too_many_nan_steps_in_a_row_stop_the_run_with_a_clear_error(shards, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, {5, 7})  # steps 3 and 4
    with pytest.raises(FloatingPointError, match=r"step 4: .*2 non-finite steps in a row.*max_nonfinite_steps=1"):
        _train(shards, tmp_path / "run", train__max_nonfinite_steps=1)


def test_a_run_that_raises_still_sends_its_buffered_metrics(shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    _poison_forward(monkeypatch, {5, 7})  # steps 3 (skipped, not logged) and 4 (stops the run)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FloatingPointError):  # no flush interval or checkpoint reached: only the exit sends them
        _train(shards, tmp_path / "run", train__max_nonfinite_steps=1, tracking__enabled=True,
               tracking__tracking_uri=uri, tracking__flush_interval_steps=100, checkpoint__save_interval_steps=0)
    client = MlflowClient(uri)
    (failed,) = client.search_runs([client.get_experiment_by_name("famtron").experiment_id])
    assert failed.info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(failed.info.run_id, "loss")) == [1, 2]


def test_wall_budget_saves_and_stops_in_time(shards, tmp_path):
    """A 100000-step run with a 4 s budget stops with a complete, resumable checkpoint."""
    from pipeline.checkpointing.files import verify_checkpoint

    started = time.monotonic()
    summary = _train(shards, tmp_path / "run", train__steps=100000, optim__warmup_steps=10,
                     train__eval_interval_steps=0, checkpoint__save_interval_steps=0, train__max_wall_seconds=4)
    assert summary["status"] == "KILLED" and 1 <= summary["step"] < 100000
    assert verify_checkpoint(summary["last_checkpoint"]) is None
    assert time.monotonic() - started < 60  # setup + 4 s + one save, with a wide margin for a loaded machine


@pytest.mark.parametrize("override, message", [
    ("--train.max_wall_seconds=0", r"train.max_wall_seconds=0.0: must be > 0 or null"),
    ("--train.max_nonfinite_steps=-1", r"train.max_nonfinite_steps=-1: must be >= 0"),
    ("--parallel.timeout_seconds=0", r"parallel.timeout_seconds=0.0: must be > 0"),
])
def test_fault_settings_are_validated(override, message):
    from pipeline.config.load import load_config
    from pipeline.config.rules import validate

    validate(load_config(None, ["--data.train_manifest=x.json"]))  # the defaults pass
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, ["--data.train_manifest=x.json", override]))
