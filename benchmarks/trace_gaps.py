"""Why the GPU idled: the gaps between a profiled step's kernels, read from its Chrome trace.

    python -m benchmarks.trace_gaps TRACE.json.gz [--min-us 5] [--top 10]

The trace is what `benchmarks.train_step --profile --trace DIR` saves (benchmarks/profiling.py
save_trace): the CPU's operators and runtime calls and the device's kernels, copies and memsets. Each
gap (the device idle between one device event's end and the next one's start, streams overlapping
counted once) is put in one of three classes, by the runtime call that launched the kernel after it
(the same `correlation` id):
  - waited for the CPU: the launch came after the GPU had run dry, so the host was behind. The
    innermost CPU operator around that launch names what the host was doing;
  - inside a CUDA graph: both kernels came from one graph launch (cudaGraphLaunch), so the gap is the
    device's own, between dependent kernels of a captured loop;
  - launched in time: the launch came earlier, outside a graph (a dependency on another stream, or the
    device's own latency between kernels).
issue 13's fam-1b at 8k, micro-batch 4, idled about 19 ms a step where bswa-1b idled none
(benchmarks/results/2026-12-02-1xH200, session 21); which class that is decides what to shorten.
A caution: the traced run records the CPU's operators and their shapes, which slows the host, so
it can wait for the CPU where an unprofiled step does not. Compare its idle total with the one
`--profile` prints from its kernel-only run before reading the first class as the cause.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from benchmarks.profiling import iter_gaps

DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")  # cudaLaunchKernel, cudaGraphLaunch, ...; Triton's cuLaunchKernel
CLASSES = ("waited for the CPU", "inside a CUDA graph", "launched in time")


@dataclass
class Gap:
    start_us: float
    us: float
    before: str
    after: str
    cause: str  # one of CLASSES
    host_op: str  # the innermost CPU operator around a late launch, else ""


def load_events(path: str | Path) -> list[dict]:
    """The trace's complete ("X") events. A missing or unreadable file is an error that names it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except (OSError, ValueError, EOFError, zlib.error) as err:  # missing, not JSON, a cut or corrupt gzip
        raise SystemExit(f"{path}: not a readable Chrome trace ({err}); give one that "
                         "`benchmarks.train_step --profile --trace DIR` wrote") from None
    events = data.get("traceEvents") if isinstance(data, dict) else None
    if not isinstance(events, list):
        raise SystemExit(f"{path}: no traceEvents list; is this a Chrome trace?")
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def _correlation(event: dict):
    return (event.get("args") or {}).get("correlation")


class _HostOps:
    """The CPU operators of each thread, to find the innermost one around a moment."""

    def __init__(self, events: list[dict]):
        self.by_thread: dict = {}
        for e in events:
            if e.get("cat") == "cpu_op":
                self.by_thread.setdefault(e.get("tid"), []).append(e)
        for ops in self.by_thread.values():
            ops.sort(key=lambda e: e["ts"])
        self.starts = {tid: [e["ts"] for e in ops] for tid, ops in self.by_thread.items()}

    def around(self, tid, ts: float, look_back: int = 5000) -> str:
        """The operator with the latest start that holds `ts` (nested operators start later), looking
        back over at most `look_back` operators; "" if none."""
        ops = self.by_thread.get(tid, [])
        end = bisect.bisect_right(self.starts.get(tid, []), ts)
        for e in reversed(ops[max(0, end - look_back) : end]):
            if ts <= e["ts"] + e["dur"]:
                return e["name"]
        return ""


def find_gaps(events: list[dict], min_us: float = 0.0) -> list[Gap]:
    """Every device idle gap of at least `min_us`, in time order, with its class (module docstring)."""
    launches = {_correlation(e): e for e in events if e.get("cat") in LAUNCHES and _correlation(e) is not None}
    host = _HostOps(events)
    device = sorted((e for e in events if e.get("cat") in DEVICE), key=lambda e: e["ts"])
    gaps = []
    for start, us, last, e in iter_gaps((e["ts"], e["ts"] + e["dur"], e) for e in device):
        if us < min_us:
            continue
        launch = launches.get(_correlation(e))
        same_graph = launch is not None and launch["name"].startswith("cudaGraphLaunch") and \
            _correlation(last) == _correlation(e)
        if launch is not None and launch["ts"] > start:
            cause, op = CLASSES[0], host.around(launch.get("tid"), launch["ts"])
        else:
            cause, op = (CLASSES[1] if same_graph else CLASSES[2]), ""
        gaps.append(Gap(start, us, last["name"], e["name"], cause, op))
    return gaps


def summary(gaps: list[Gap], top: int = 10) -> dict:
    """ms and gaps by class, the host operators the GPU waited on (ms, gaps), and the `top` largest gaps."""
    by_class = {c: [0.0, 0] for c in CLASSES}
    host: dict = {}
    for g in gaps:
        by_class[g.cause][0] += g.us / 1e3
        by_class[g.cause][1] += 1
        if g.host_op or g.cause == CLASSES[0]:
            entry = host.setdefault(g.host_op or "(no operator)", [0.0, 0])
            entry[0] += g.us / 1e3
            entry[1] += 1
    waited = sorted(([name, ms, n] for name, (ms, n) in host.items()), key=lambda r: -r[1])[:top]
    largest = sorted(gaps, key=lambda g: -g.us)[:top]
    return {"ms": sum(g.us for g in gaps) / 1e3, "gaps": len(gaps), "by_class": by_class, "waited_on": waited,
            "largest": largest}


def print_summary(found: dict) -> None:
    print(f"device idle {found['ms']:.2f} ms in {found['gaps']:,} gaps")
    for cause, (ms, n) in found["by_class"].items():
        print(f"  {cause}: {ms:.2f} ms in {n:,} gaps")
    if found["waited_on"]:
        print("the CPU operators the GPU waited on (innermost at the late launch):")
        for name, ms, n in found["waited_on"]:
            print(f"  {ms:.2f} ms in {n:,} gaps: {name[:100]}")
    print("largest gaps:")
    for g in found["largest"]:
        where = f" (CPU in {g.host_op[:60]})" if g.host_op else ""
        print(f"  {g.us:.1f} us, {g.cause}{where}: {g.before[:50]} -> {g.after[:50]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="a Chrome trace (.json or .json.gz) from train_step --trace")
    parser.add_argument("--min-us", type=float, default=0.0, help="leave out gaps shorter than this")
    parser.add_argument("--top", type=int, default=10, help="how many operators and gaps to list")
    opts = parser.parse_args(argv)
    print_summary(summary(find_gaps(load_events(opts.trace), opts.min_us), opts.top))


if __name__ == "__main__":
    main()
