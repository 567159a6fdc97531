"""Fault tolerance for the training loop: stop signals and a wall-time budget, non-finite loss
skipping, and the records a requeued Slurm job needs (the collective timeouts are set where the
process groups start, pipeline/parallel/groups.py).

How a time-limited Slurm job continues (slurm/train.sbatch):
  1. Slurm sends USR1 to the batch shell `--signal=B:USR1@<seconds>` before the time limit;
     the shell forwards it to every process of the training step (torchrun ignores it).
  2. `StopRequest` notes the signal; the loop finishes the current step, all ranks agree,
     save a checkpoint and leave with status KILLED (resumable); rank 0 writes that word to
     $FAMTRON_STATUS_FILE; every worker exits 0.
  3. The batch shell reads the status and runs `scontrol requeue`; the next attempt starts
     with `checkpoint.resume=auto` from the newest complete checkpoint.
`train.max_wall_seconds` stops the same way when the next step and a save would not fit.

A rank that dies: torchrun (`--max-restarts 0`) tears its node down and `srun --kill-on-bad-exit`
the other nodes; a rank that merely hangs is ended by the process groups' timeout
(`parallel.timeout_seconds`) instead of blocking its peers for torch's default 30 minutes.
The job then fails (no requeue loop on a crash); resubmitting it resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("famtron")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STATUS_FILE_ENV = "FAMTRON_STATUS_FILE"  # set by slurm/train.sbatch, read by it after the step ends


# ---------------------------------------------------------------- stopping in time


class StopRequest:
    """Context manager: records SIGINT/SIGTERM/SIGUSR1 (Slurm's time-limit warning and
    `scancel`) so the loop stops after the current step; a second SIGINT aborts at once.
    Also stops when the wall-time budget will not hold another step plus a save."""

    def __init__(self, max_wall_seconds: float | None = None, signals=STOP_SIGNALS):
        self.reason: str | None = None
        self.budget = WallBudget(max_wall_seconds)
        self._signals, self._previous = signals, {}

    @property
    def stop(self) -> bool:
        return self.reason is not None

    def __enter__(self) -> "StopRequest":
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("signal %d: stopping after this step with a checkpoint (%s; Ctrl-C again to abort)", signum,
                    signal.Signals(signum).name)
        self.reason = signal.Signals(signum).name
        if signum == signal.SIGINT:  # Ctrl-C again: abort now (a USR1/TERM then Ctrl-C still saves)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def check_budget(self, step_seconds: float, save_seconds: float) -> None:
        if self.reason is None and self.budget.exhausted(step_seconds, save_seconds):
            log.warning("train.max_wall_seconds=%s: %s left, less than twice the slowest step (%.1f s) and save "
                        "(%.1f s); stopping with a checkpoint", self.budget.max_wall_seconds,
                        f"{self.budget.left():.0f} s", *self.budget.margins())
            self.reason = "max_wall_seconds"

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank wants to stop (each has its own signals and clock),
        so all of them save and leave together. A collective: call it on every rank."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.stop
        flag = torch.tensor([float(self.stop)], device=device)
        dist.all_reduce(flag)
        return bool(flag.item())


class WallBudget:
    """`train.max_wall_seconds`, counted from the start of the training loop (setup and imports
    are not included: leave them out of the budget you give). The margin is the slowest step seen and the
    slowest save seen (a first save is guessed as a step), doubled for jitter. The first step is
    not a guide: it compiles and warms caches (tens of seconds on a GPU, against milliseconds for
    the next ones; counted, it stopped a 225 s PassKey run after 60 s)."""

    def __init__(self, max_wall_seconds: float | None, start: float | None = None):
        self.max_wall_seconds = max_wall_seconds
        self.start = time.monotonic() if start is None else start
        self._step, self._save, self._steps_seen = 0.0, 0.0, 0

    def left(self) -> float:
        return math.inf if self.max_wall_seconds is None else self.max_wall_seconds - (time.monotonic() - self.start)

    def exhausted(self, step_seconds: float, save_seconds: float) -> bool:
        self._steps_seen += 1
        if self._steps_seen > 1:
            self._step = max(self._step, step_seconds)
        self._save = max(self._save, save_seconds)
        return self.left() < 2 * sum(self.margins())

    def margins(self) -> tuple[float, float]:
        """(slowest step, slowest save or else the slowest step), in seconds."""
        return self._step, self._save or self._step


# ---------------------------------------------------------------- non-finite losses


class NonFiniteGuard:
    """Skip a step whose loss or gradient norm is NaN/inf (no optimizer update; the batch is
    consumed, so the data order stays that of a clean run) and count it; more than
    `max_consecutive` in a row means the run has diverged, not hit a bad batch: stop.
    The plain loop and PP without ZeRO ask before optimizer.step(); under ZeRO (PP or not) the
    engine has already discarded such a step itself, since pipeline/parallel/zero.py makes a non-finite
    loss give NaN gradients, and the guard decides on the same values: weights and AdamW state
    are unchanged either way (tests/test_nonfinite.py)."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped, self.consecutive = 0, 0

    def should_skip(self, step: int, loss: float, grad_norm: float) -> bool:
        """Decide on values that are identical on every rank (DP-reduced loss, global norm)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return False
        self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
        if self.consecutive > self.max_consecutive:
            raise FloatingPointError(
                f"step {step}: loss {loss}, grad norm {grad_norm}: {self.consecutive} non-finite steps in a row, more "
                f"than train.max_nonfinite_steps={self.max_consecutive}. The run has diverged; lower optim.lr or "
                "raise optim.warmup_steps and restart from an earlier checkpoint (checkpoint.resume=<step folder>)"
            )
        log.warning("step %d: loss %s, grad norm %s: skipping the update (%d in a row, %d in total)",
                    step, loss, grad_norm, self.consecutive, self.skipped)
        return True


# ---------------------------------------------------------------- records


def write_status(status: str) -> None:
    """Rank 0: tell slurm/train.sbatch how the run ended (FINISHED, KILLED = resumable, FAILED)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(status + "\n")


class SampleKeyRecorder:
    """`train.record_sample_keys=<folder>`: each rank appends one JSON line per finished step,
    {"step", "pid", "keys"}, to keys_rNNNNN.jsonl. A step redone after a resume appears again;
    tests check the redone step drew the same keys and that the steps' union is a clean run's."""

    def __init__(self, folder: str | None, rank: int):
        self.path = None if not folder else Path(folder) / f"keys_r{rank:05d}.jsonl"
        self._pending: list[str] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, keys: list[str]) -> None:
        if self.path is not None:
            self._pending.extend(keys)

    def step_done(self, step: int) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:  # one write per line: a kill leaves whole lines only
            f.write(json.dumps({"step": step, "pid": os.getpid(), "keys": self._pending}) + "\n")
        self._pending = []


def read_sample_keys(folder: str | Path) -> dict[int, dict[int, list[list[str]]]]:
    """{rank: {step: [keys of each time the step ran]}} from a SampleKeyRecorder folder."""
    out: dict[int, dict[int, list[list[str]]]] = {}
    for path in sorted(Path(folder).glob("keys_r*.jsonl")):
        rank = int(path.stem[len("keys_r"):])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out.setdefault(rank, {}).setdefault(record["step"], []).append(record["keys"])
    return out
