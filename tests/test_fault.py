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
from tests.time_bounds import HANG_GUARD_SECONDS, LOAD_MARGIN_SECONDS


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
    assert not budget.exhausted(step_seconds=60.0, save_seconds=0.0)  # a compiling first step is no guide
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


def _hung_peer_worker(rank: int, world_size: int, timeout_seconds: float, done_file: str) -> dict:
    """Rank 1 stops taking part (as if frozen) but stays alive until rank 0 is done, so rank 0's
    collectives on the default group and on megatron's data-parallel group can only end by
    their timeout, never by rank 1's exit closing the connection."""
    import torch.distributed as dist

    from pipeline.parallel.groups import start_groups

    groups = start_groups(1, 1, "gloo", timeout_seconds, device="cpu")
    out = {}
    if rank == 1:
        deadline = time.monotonic() + HANG_GUARD_SECONDS
        while not os.path.exists(done_file) and time.monotonic() < deadline:
            time.sleep(0.1)
        return out
    for name, group in (("default", None), ("data_parallel", groups.dp_group)):
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
            out[name] = ("returned", time.monotonic() - started)
        except RuntimeError as err:
            out[name] = (type(err).__name__, time.monotonic() - started)
    open(done_file, "w").close()
    return out


def test_collectives_time_out_instead_of_hanging_on_a_silent_peer(tmp_path):
    """The default of 30 minutes would hang this test; a 3 s timeout must end each wait in no
    less than 3 s (gloo does not give up early; 0.5 s for its millisecond deadline and the two
    clock readings) and no more than 3 s plus the load margin (waking a thread, raising)."""
    timeout = 3.0
    result = run_on_ranks(_hung_peer_worker, 2, timeout, str(tmp_path / "done"))[0]
    for group in ("default", "data_parallel"):
        outcome, seconds = result[group]
        assert outcome != "returned" and timeout - 0.5 <= seconds <= timeout + LOAD_MARGIN_SECONDS, (group, result)


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


def _time_the_loop(monkeypatch) -> dict:
    """Spy on the training loop: its StopRequest (the wall budget's start, the loop's end, the
    slowest step the budget saw, why it stopped), when each step began, each save's seconds."""
    import pipeline.training.loop as train_module

    seen: dict = {"step_starts": [], "saves": []}
    real_step, real_save = train_module.train_step, train_module.save

    class TimedStopRequest(train_module.StopRequest):
        def __exit__(self, *exc):
            seen.update(start=self.budget.start, end=time.monotonic(), slowest_step=self.budget._step,
                        reason=self.reason)
            return super().__exit__(*exc)

    def timed_step(*args, **kwargs):
        seen["step_starts"].append(time.monotonic())
        return real_step(*args, **kwargs)

    def timed_save(*args, **kwargs):
        started = time.monotonic()
        path = real_save(*args, **kwargs)
        seen["saves"].append(time.monotonic() - started)
        return path

    monkeypatch.setattr(train_module, "StopRequest", TimedStopRequest)
    monkeypatch.setattr(train_module, "train_step", timed_step)
    monkeypatch.setattr(train_module, "save", timed_save)
    return seen


def test_wall_budget_saves_and_stops_in_time(shards, tmp_path, monkeypatch):
    """A 100000-step run with a 4 s budget stops with a complete, resumable checkpoint, and in
    time: no step begins once the budget has run out, so the run ends at most one step and one save
    after it. Load-proof, as the budget keeps 2 x (slowest step + slowest save) in hand, while what
    runs between a step and the next is a log line; setup is outside the budget."""
    from pipeline.checkpointing.files import verify_checkpoint

    budget = 4.0
    seen = _time_the_loop(monkeypatch)
    summary = _train(shards, tmp_path / "run", train__steps=100000, optim__warmup_steps=10,
                     train__eval_interval_steps=0, checkpoint__save_interval_steps=0, train__max_wall_seconds=budget)
    assert summary["status"] == "KILLED" and 1 <= summary["step"] < 100000 and seen["reason"] == "max_wall_seconds"
    assert verify_checkpoint(summary["last_checkpoint"]) is None and len(seen["saves"]) == 1
    last_step_began = seen["step_starts"][-1] - seen["start"]
    assert last_step_began < budget, seen
    # Nor early: it stops once less than 2 x (step + save) is left, a save guessed as a step until one is seen.
    assert seen["end"] - seen["start"] >= budget - 4 * seen["slowest_step"], seen


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
