"""Rank-0 console output: one logger that does not break the tqdm bar, the interval meter
that turns step timings into the `step | loss | lr | grad norm | tok/s | MFU | ETA` line, and the
end-of-run peak-memory line."""

from __future__ import annotations

import logging
import sys

import torch

from pipeline.training.flops import mfu

log = logging.getLogger("famtron")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(is_rank0: bool) -> None:
    """The `famtron` logger: INFO on rank 0, warnings and errors only on other ranks."""
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s famtron %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if is_rank0 else logging.WARNING)
    log.propagate = False


def build_progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def log_peak_memory(memory: dict) -> None:
    """The end-of-run line of pipeline/parallel/collectives.py peak_memory's figures."""
    gpu = memory["peak_gpu_gib"]
    log.info("peak memory: GPU %s allocated (max over ranks) | host RSS %.1f GiB (max over ranks), %.1f GiB (summed "
             "over one host's ranks)", "n/a" if gpu is None else f"{gpu:.2f} GiB", memory["peak_host_gib"],
             memory["peak_host_node_gib"])


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class IntervalMeter:
    """Means over the steps since the last log line. Time counts training steps only, so
    validation and checkpoint writes do not deflate tokens/s."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None, n_devices: int, total_steps: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops, self.n_devices, self.total_steps = peak_flops, n_devices, total_steps
        self._reset()

    def _reset(self) -> None:
        self.loss, self.seconds, self.steps = 0.0, 0.0, 0

    def add(self, loss: float, seconds: float) -> None:
        self.loss, self.seconds, self.steps = self.loss + loss, self.seconds + seconds, self.steps + 1

    def report(self, step: int, lr: float, grad_norm: float) -> dict[str, float | None]:
        """The metrics of the interval ending at `step` (logged to the console), then reset."""
        tokens_per_s = self.tokens_per_step * self.steps / max(self.seconds, 1e-9)
        metrics = {
            "loss": self.loss / self.steps, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.n_devices),
        }
        eta = self.seconds / self.steps * (self.total_steps - step)
        util = "n/a" if metrics["mfu"] is None else f"{100 * metrics['mfu']:.1f}%"
        memory = ""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            metrics["gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            memory = f" | peak mem {metrics['gpu_memory_gib']:.1f} GiB"
        log.info("step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | MFU %s%s | ETA %s", step,
                 self.total_steps, metrics["loss"], lr, grad_norm, f"{tokens_per_s:,.0f}", util, memory,
                 format_duration(eta))
        self._reset()
        return metrics
