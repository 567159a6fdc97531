"""One layer's matmuls in FAM's two layouts, against BSWA's: a GPU probe for issue 13.

    python -m benchmarks.block_rows_probe --config fam-1b --seq-lens 8192 65536 --micro-batch 1 4

fam-1b's step today (model/fast_scan.py) runs each layer's four matmuls (QKV, output, fc1, fc2)
as two parts:
  whole   the b*S block rows at once, as bswa-1b does;
  scan    T sequential steps of F*b FAM rows each, forward and activation gradients. Every step
          reads all of the layer's weights, so these GEMMs are bound by memory at small b.
          The FAM rows' weight gradients are one GEMM over all T*F*b rows, added to the block
          rows' (autograd's add, in bf16).
The reference's layout (model/reference.py: the rows [F_{t-1}; block t] per block) would run
  block   T sequential steps of (F + C)*b rows each, forward and activation gradients, and one
          weight-gradient GEMM over all T*(F + C)*b rows: FAM's extra F/C of FLOPs, at the
          block rows' GEMM sizes, and no F-row GEMM at all.
This probe times the matmuls of each plan, forward and backward, for one layer at the config's
shapes, bf16, on one stream, and prints each against `whole`. Attention, norms and pointwise work
are left out, so it bounds what the layout alone can gain; it is not a training step. (The
`scan` row's GEMMs are also in benchmarks/results' profiles: about 106 us per block step at
micro-batch 1 on an H200, session 15.)
"""

from __future__ import annotations

import itertools
import math

import torch

from benchmarks import probe_cli
from model.config import ModelArgs
from pipeline.training.flops import layer_matmul_params, layer_matmul_shapes

PLANS = ("whole", "scan", "block")


def plan_rows(args: ModelArgs, seq: int, micro_batch: int) -> dict[str, list[int]]:
    """Each plan's sequential steps as row counts per step; `scan` is the whole step then its T steps."""
    blocks, F = math.ceil(seq / args.block_size), args.fam_len
    sizes = [min(args.block_size, seq - t * args.block_size) for t in range(blocks)]  # the last may be partial
    return {"whole": [seq * micro_batch], "scan": [seq * micro_batch] + [F * micro_batch] * blocks,
            "block": [(F + c) * micro_batch for c in sizes]}


def plan_flops(args: ModelArgs, rows: list[int]) -> float:
    """Forward and backward (activation and weight gradients) matmul FLOPs of one layer."""
    return 6.0 * sum(rows) * layer_matmul_params(args)


class Plan:
    """Preallocated inputs, output gradients and weights for one plan: `run()` is one layer's matmuls,
    forward then backward, the steps in order (as the scan runs them: each step's rows at once). Each
    matmul's rows are one tensor and the steps are slices of it, so a weight gradient over all rows
    reads them in place."""

    def __init__(self, args: ModelArgs, rows: list[int], split_weight_grad: bool, device, dtype):
        make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype) * 0.02  # noqa: E731
        self.weights = [make(k, n) for k, n in layer_matmul_shapes(args)]
        self.inputs = [make(sum(rows), k) for k, _ in layer_matmul_shapes(args)]
        self.grads = [make(sum(rows), n) for _, n in layer_matmul_shapes(args)]
        ends = list(itertools.accumulate(rows))
        self.steps = [slice(end - r, end) for r, end in zip(rows, ends)]
        # scan: the block rows' weight gradient, then the FAM rows' in one GEMM, added to it
        self.parts = [self.steps[0], slice(rows[0], ends[-1])] if split_weight_grad else [slice(0, ends[-1])]

    def run(self) -> list[torch.Tensor]:
        for step in self.steps:  # forward
            for x, w in zip(self.inputs, self.weights):
                x[step] @ w
        for step in reversed(self.steps):  # activation gradients, last step first
            for dy, w in zip(self.grads, self.weights):
                dy[step] @ w.T
        grads = []
        for x, dy in zip(self.inputs, self.grads):  # weight gradients: one GEMM per part
            grad = None
            for part in self.parts:
                g = x[part].T @ dy[part]
                grad = g if grad is None else grad + g
            grads.append(grad)
        return grads


def time_plan(plan: Plan, device: str, warmup: int, iters: int) -> float:
    """Seconds per run() (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        plan.run()
    if device == "cuda":
        return probe_cli.cuda_seconds(plan.run, iters)
    return probe_cli.wall_seconds(plan.run, iters)


def probe(args: ModelArgs, seq: int, micro_batch: int, device: str, warmup: int, iters: int) -> dict:
    plans = plan_rows(args, seq, micro_batch)
    row = {"seq_len": seq, "micro_batch": micro_batch,
           "flop_ratio": plan_flops(args, plans["block"]) / plan_flops(args, plans["whole"])}
    for name, rows in plans.items():
        plan = Plan(args, rows, name == "scan", device, torch.bfloat16 if device == "cuda" else torch.float32)
        seconds = time_plan(plan, device, warmup, iters)
        row[name] = {"ms": seconds * 1e3, "tflops": plan_flops(args, rows) / seconds / 1e12}
        del plan
    return row


def print_table(name: str, rows: list[dict], device: str) -> None:
    """`scan` and `block` run the same FLOPs (S*b + T*F*b rows), so whole / plan is how near the
    plan's matmuls come to BSWA's: a bound on fam / bswa for a step the matmuls dominate."""
    print(f"\n{name}: one layer's matmuls, forward and backward ({device})")
    print("| sequence | micro-batch | whole ms | scan ms | block ms | whole / scan | whole / block | FLOPs / whole's "
          "| TFLOP/s whole, scan, block |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w, s, b = (r[p] for p in PLANS)
        print(f"| {r['seq_len']:,} | {r['micro_batch']} | {w['ms']:.2f} | {s['ms']:.2f} | {b['ms']:.2f} "
              f"| {w['ms'] / s['ms']:.3f} | {w['ms'] / b['ms']:.3f} | {r['flop_ratio']:.4f} "
              f"| {w['tflops']:.3g}, {s['tflops']:.3g}, {b['tflops']:.3g} |")


def main(argv: list[str] | None = None) -> list[dict]:
    return probe_cli.main(argv, __doc__.split("\n")[0], "block_rows_probe", probe, print_table,
                          seq_lens=[8192, 32768, 65536, 131072], micro_batch=[1, 2, 4], warmup=2, iters=5)


if __name__ == "__main__":
    main()
