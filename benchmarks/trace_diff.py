"""Which kernels one profiled step runs beyond another's: two Chrome traces compared by kernel name.

    python -m benchmarks.trace_diff FAM.trace.json.gz BSWA.trace.json.gz [--top 30]

The traces are what `benchmarks.train_step --profile --trace DIR` saves (one profiled step each). Device
events (kernels, copies, memsets) are summed by name in each; the names are listed by the first trace's
extra time over the second's, with launches and ms in each. A second table groups the kernels that only
the first runs by their launch count a step: a FAM scan step's kernels run a multiple of T x layers (or
(T + 1) x layers) times, so that count points at them. Session 22 read issue 13's fam-1b against
bswa-1b at 8k, micro-batch 4, this way (benchmarks/results/2026-12-02-1xH200, call_s22a_traces): 59 ms
more, 47 of them in kernels launched 144, 162 or 324 times (T = 8, 18 layers, once or twice a step).
"""

from __future__ import annotations

import argparse
import collections

from benchmarks.trace_gaps import DEVICE, load_events


def kernel_time(events: list[dict]) -> dict[str, list]:
    """{name: [launches, us]} of a trace's device events."""
    found: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in DEVICE:
            found[e["name"]][0] += 1
            found[e["name"]][1] += e["dur"]
    return dict(found)


def diff(first: dict, second: dict) -> list[tuple]:
    """(name, extra ms, launches and ms in first, in second), the largest extra first."""
    rows = []
    for name in set(first) | set(second):
        (n1, us1), (n2, us2) = first.get(name, (0, 0.0)), second.get(name, (0, 0.0))
        rows.append((name, (us1 - us2) / 1e3, n1, us1 / 1e3, n2, us2 / 1e3))
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def only_first_by_launches(first: dict, second: dict) -> list[tuple]:
    """(launches a step, kernels, ms) of the kernels only the first runs, grouped by launch count."""
    groups: dict[int, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, (n, us) in first.items():
        if name not in second:
            groups[n][0] += 1
            groups[n][1] += us / 1e3
    return sorted(((n, k, ms) for n, (k, ms) in groups.items()), key=lambda r: -r[2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first", help="a Chrome trace (.json or .json.gz) from train_step --trace")
    parser.add_argument("second", help="the trace to compare it with")
    parser.add_argument("--top", type=int, default=30, help="how many kernel names to list")
    opts = parser.parse_args(argv)
    first, second = kernel_time(load_events(opts.first)), kernel_time(load_events(opts.second))
    total = [sum(us for _, us in k.values()) / 1e3 for k in (first, second)]
    launches = [sum(n for n, _ in k.values()) for k in (first, second)]
    print(f"first: {total[0]:.1f} ms in {launches[0]:,} device events; second: {total[1]:.1f} ms in "
          f"{launches[1]:,}; {total[0] - total[1]:+.1f} ms")
    print("| extra ms | first: launches | ms | second: launches | ms | kernel |")
    print("|---|---|---|---|---|---|")
    for name, extra, n1, ms1, n2, ms2 in diff(first, second)[: opts.top]:
        print(f"| {extra:+.2f} | {n1:,} | {ms1:.2f} | {n2:,} | {ms2:.2f} | {name[:90]} |")
    print("\nkernels only the first runs, by launches a step:")
    print("| launches | kernels | ms |")
    print("|---|---|---|")
    for n, kernels, ms in only_first_by_launches(first, second):
        print(f"| {n:,} | {kernels} | {ms:.2f} |")


if __name__ == "__main__":
    main()
