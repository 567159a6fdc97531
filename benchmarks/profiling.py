"""Where a step's GPU time goes: kernels per step, the time some kernel ran, every kernel by name.

    found = profile_kernels(step, steps=1)   # step() runs `steps` training steps; CUDA kernels
    found["kernels_per_step"], found["kernel_ms"], found["kernels"][:8], found["ops"][:8]

Used by `benchmarks.train_step --profile` for famtron's cells and for the plain anchor's, so the
two can be diffed kernel by kernel from --json. `ops` names what launched the time: the operators
(with their input shapes) ranked by the kernel time they launched themselves, so "365 copies of
33 us" reads as "aten::copy_ of [24576, 1536] bf16 into fp32". `device="cpu"` profiles the CPU's operators
instead (the tests: the same counting, on this machine).

`gaps` says where the GPU idles between a step's kernels (`idle_gaps`): the gaps summed by size and
the kernel pairs with the most idle time between them, plus the time of copies and memsets, which the
kernel time leaves out. issue 13's fam-1b at 8k, micro-batch 4, idled 16.5 ms a step in these gaps and
bswa-1b 9.2 ms (benchmarks/results/2026-12-02-1xH200, session 22): 3.5 ms of the difference one gap of
up to 2 us per kernel, 2.9 ms gaps of 10-100 us at the scan's edges. The unprofiled wall time less the
kernel time, which session 21 read as idle (19 ms against none), is not: kernels overlap.

`host_ms` and `syncs` tell a CPU-bound step from a GPU-bound one: the CPU time to issue one step
(until step() returns, before waiting for the GPU) and every call that made the CPU wait for the
GPU (torch.cuda.set_sync_debug_mode), by the Python line that made it. A step whose host_ms
reaches its wall time, or that waits inside, leaves the GPU idle: issue 13's fam-1b at 8k tokens
ran 79-87 % busy against bswa-1b's 91-99 %.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch


def profile_kernels(step: Callable[[], object], steps: int = 1, device: str = "cuda",
                    wall_seconds: float | None = None, trace_path: str | os.PathLike | None = None) -> dict:
    """Run `step()` (`steps` training steps) under torch.profiler. Per step: launches, the union of
    the kernels' intervals in ms (`kernel_ms`: streams may overlap), and every kernel name
    (first 100 characters) as [name, launches, ms], longest total first. Copies and memsets are
    left out. The first 8 of `kernels` are what the console shows. `ops`: the OPS operators with
    the most self time on the device, as [name, input shapes, calls, ms] per step (kernels in a
    CUDA graph replay count under the replay), from a second profiled run of `step`. With
    `wall_seconds` (one unprofiled step's), also `gpu_busy`: kernel time over wall time. With
    `trace_path`, that second run's timeline is saved there (`save_trace`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activity, kind = (ProfilerActivity.CUDA, DeviceType.CUDA) if cuda else (ProfilerActivity.CPU, DeviceType.CPU)
    with profile(activities=[activity]) as prof:  # the device's own events: no CPU annotations among kernels
        step()
        if cuda:
            torch.cuda.synchronize()
    device = [e for e in prof.profiler.kineto_results.events() if e.device_type() == kind]
    copies = [e for e in device if e.name().startswith(("Memcpy", "Memset"))]
    events = [e for e in device if not e.name().startswith(("Memcpy", "Memset"))]
    if not cuda:  # operators nest on the CPU: count the outermost aten ones only
        events = [e for e in events if e.name().startswith("aten::")]
        events = _outermost(events)
    busy_ns = union_ns([(e.start_ns(), e.end_ns()) for e in events])
    by_name: dict[str, list] = {}
    for e in events:
        entry = by_name.setdefault(e.name()[:100], [0, 0])
        entry[0] += 1
        entry[1] += e.duration_ns()
    per_step = lambda n: n // steps if n % steps == 0 else n / steps  # noqa: E731  (counts stay ints when they can)
    ranked = sorted(([name, per_step(n), ns / 1e6 / steps] for name, (n, ns) in by_name.items()), key=lambda r: -r[2])
    gaps = idle_gaps([(e.start_ns(), e.end_ns(), e.name()) for e in events], steps)
    gaps["copy_ms"] = union_ns([(e.start_ns(), e.end_ns()) for e in copies]) / 1e6 / steps
    found = {"kernels_per_step": per_step(len(events)), "kernel_ms": busy_ns / 1e6 / steps, "kernels": ranked,
             "gaps": gaps, "ops": _ops(step, steps, cuda, trace_path), **host_side(step, steps, cuda)}
    if wall_seconds:
        found["gpu_busy"] = found["kernel_ms"] / 1e3 / wall_seconds
    return found


OPS = 60
GAP_SIZES_US = (2, 10, 100)  # idle_gaps' bins: up to 2 us, 2-10, 10-100, over 100
GAP_PAIRS = 10  # the kernel pairs idle_gaps lists


def union_ns(intervals: list) -> int:
    """The time covered by (start, end) intervals, overlaps counted once."""
    busy, covered_to = 0, 0
    for start, end in sorted(intervals):
        busy += max(0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
    return busy


def iter_gaps(intervals):
    """(start, length, item before, item after) of each idle gap between (start, end, item) intervals given
    in start order: a gap runs from the latest end so far (streams may overlap) to the next start, and the
    item before it is the one that ended last."""
    covered_to, last = None, None
    for start, end, item in intervals:
        if covered_to is not None and start > covered_to:
            yield covered_to, start - covered_to, last, item
        if covered_to is None or end > covered_to:
            covered_to, last = end, item


def idle_gaps(kernels: list, steps: int = 1) -> dict:
    """The idle time between (start_ns, end_ns, name) kernels, per step: `ms` in all, `count`, `by_size` (ms in
    each bin of GAP_SIZES_US, labelled by its upper bound, the last "more") and `pairs`, the GAP_PAIRS
    [kernel before, kernel after, gaps, ms] with the most idle time between them (names to 60 characters).
    Gaps as `iter_gaps` finds them."""
    bins = [f"<={n}us" for n in GAP_SIZES_US] + ["more"]
    by_size, pairs = dict.fromkeys(bins, 0.0), {}
    total, count = 0, 0
    for _, gap, last, name in iter_gaps(sorted(kernels)):
        total, count = total + gap, count + 1
        by_size[next((b for b, n in zip(bins, GAP_SIZES_US) if gap <= n * 1e3), "more")] += gap / 1e6 / steps
        entry = pairs.setdefault((last[:60], name[:60]), [0, 0])
        entry[0] += 1
        entry[1] += gap
    ranked = sorted(([a, b, n / steps, ns / 1e6 / steps] for (a, b), (n, ns) in pairs.items()), key=lambda r: -r[3])
    return {"ms": total / 1e6 / steps, "count": count / steps, "by_size": by_size, "pairs": ranked[:GAP_PAIRS]}


def host_side(step: Callable[[], object], steps: int, cuda: bool) -> dict:
    """`host_ms`: CPU time per step to run step() (the GPU's work issued, not waited for); `syncs`:
    [where, calls per step] of every CUDA call that waited for the GPU, most first (CUDA only; none
    is expected inside a training step). `where` is the Python line that waited and, when that line
    is torch's own, " <- " the innermost line outside torch that led to it. That is how the one
    `torch.cuda.synchronize` per step seen on an H200 (2026-11-30) was placed: it was this function's
    own `set_sync_debug_mode("warn")` (torch 2.11), now outside the recording."""
    if cuda:
        torch.cuda.synchronize()
    before = _allocator_counts(cuda)
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[sync_site(filename, lineno, traceback.extract_stack()[:-1])] += 1

    if cuda:  # torch 2.11 reports a wait inside set_sync_debug_mode itself: not the step's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings():  # puts warnings.showwarning back on the way out
        warnings.simplefilter("always")
        warnings.showwarning = record  # called where the wait happens: the stack is still there
        try:
            start = time.perf_counter()
            step()
            host = time.perf_counter() - start
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    if cuda:
        torch.cuda.synchronize()
    return {"host_ms": host * 1e3 / steps, "syncs": [[site, n / steps] for site, n in sites.most_common()],
            "allocator": allocator_calls(before, _allocator_counts(cuda), steps)}


ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def _allocator_counts(cuda: bool) -> dict:
    if not cuda:
        return dict.fromkeys(ALLOCATOR_COUNTS, 0)
    stats = torch.cuda.memory_stats()
    return {name: stats.get(name, 0) for name in ALLOCATOR_COUNTS}


def allocator_calls(before: dict, after: dict, steps: int) -> dict:
    """Per step, what the caching allocator did that can leave the GPU idle without a wait that `syncs` sees:
    retries after a failed allocation (which free cached blocks), cudaMalloc and cudaFree calls (a cudaFree
    waits for the whole device) and waits for all streams."""
    return {name.removeprefix("num_"): (after[name] - before[name]) / steps for name in ALLOCATOR_COUNTS}


def sync_site(filename: str, lineno: int, stack: list) -> str:
    """"file:line" of a wait, with " <- file:line" of the innermost frame of `stack` outside torch
    when the wait is in torch's own code."""
    site = f"{filename}:{lineno}"
    if _TORCH not in Path(filename).resolve().parents:
        return site
    outside = [f for f in stack if _TORCH not in Path(f.filename).resolve().parents
               and Path(f.filename).resolve() not in _PLUMBING]
    return site if not outside else f"{site} <- {outside[-1].filename}:{outside[-1].lineno}"


_TORCH = Path(torch.__file__).resolve().parent
_PLUMBING = {Path(warnings.__file__).resolve()}  # the warning's own way to `record`


def save_trace(prof, path: str | os.PathLike) -> Path:
    """A profiled run's timeline (the CPU's operators and the device's kernels, copies and memsets) as a
    gzipped Chrome trace, written whole (temp file, rename): open it in Perfetto (ui.perfetto.dev) or read
    its `traceEvents` to find what the GPU waited for between two kernels. A missing folder is made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(partial, path)
    return path


def _ops(step: Callable[[], object], steps: int, cuda: bool, trace_path=None) -> list:
    """[operator, input shapes, calls, ms] per step, by the time of the kernels each launched itself:
    a second profiled run, with the CPU's operators and their shapes (the first counts kernels
    alone: with CPU activity, annotations such as "## Call CompiledFxGraph ##" show up on the
    device's timeline too)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if trace_path:
        save_trace(prof, trace_path)
    rows = []
    for avg in prof.key_averages(group_by_input_shape=True):
        us = avg.self_device_time_total if cuda else avg.self_cpu_time_total
        if us > 0 and avg.device_type == DeviceType.CPU and not avg.key.startswith("ProfilerStep"):  # not kernels
            rows.append([avg.key, str(avg.input_shapes)[:160], avg.count / steps, us / 1e3 / steps])
    return sorted(rows, key=lambda r: -r[3])[:OPS]


def _outermost(events: list) -> list:
    """Events not inside another of the list (CPU operators call operators)."""
    out, end = [], -1
    for e in sorted(events, key=lambda e: (e.start_ns(), -e.end_ns())):
        if e.start_ns() >= end:
            out.append(e)
            end = e.end_ns()
    return out
