"""Parallel layouts on 2 and 4 GPUs against one GPU (marked `gpu`; on a 4-GPU machine:
`pytest -m gpu -s tests/test_gpu_parallel.py`, about 5 minutes with a warm compile cache).

fam-1b with a 32k vocabulary, sequence 8192, 4 sequences per step, bf16 autocast: TP=2, PP=2,
ZeRO-2 over DP=2, plain DP=2, TP=2 x PP=2 and ZeRO-2 over DP=4, each from the same weights and
batches as the one-GPU run (benchmarks/parity_suite.py). From step 2 on, every step's loss, gradient
norm and weight checksum within benchmarks/parity_suite.py BOUNDS of the one-GPU run's, and the
memory estimator within 15% of each layout's measured peak. The table is printed (and left in
$FAMTRON_PARITY_OUT when set). Fewer steps or cells for a quick run (2 GPUs in about 4 minutes
with a warm cache): FAMTRON_PARITY_STEPS=10 FAMTRON_PARITY_CELLS="1gpu tp2 pp2 dp2"; another learning
rate: FAMTRON_PARITY_LR; more arguments of benchmarks/parallel_parity.py for every cell:
FAMTRON_PARITY_ARGS (e.g. "--eager-scan").

Measured on 2 H200s (2026-11-30, 10 steps, lr 3e-4, benchmarks/results/2026-11-30-2xH200): FAILS.
Steps 1-3 agree within 3.8e-4 (losses) and 2.1e-3 (gradient norms). After the loss spike of step 3
(8.0 -> 11.9: lr 3e-4, no warm-up) the gradient norms of TP=2 and PP=2 drift up to 7 % (step 7),
and even plain DP=2, which differs from one GPU only in the order of an fp32 sum, drifts 1.3 %;
the weight norms stay within 3e-7. Against amplified rounding alone: on 2026-11-26 (eager scan,
other data: step-1 loss 10.838) the suite held losses within 5.2e-4 over 20 steps through a spike
of the same kind. On CPU (fp32) the GPU's scan path under PP=2 (static buffers, interleaved
micro-batches) and under TP=2 equals one process (tests/test_pipeline_parallel.py,
tests/test_scan.py), so what differs is GPU-only: compiled kernels, bf16. Not yet told apart.
Next: the same cells at FAMTRON_PARITY_LR=1e-4, and with FAMTRON_PARITY_ARGS=--eager-scan."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmarks.parity_suite import CELLS, compare, print_table, run_suite

# `pytest -m gpu` on a one-GPU machine runs tests/test_gpu.py and reports this one as skipped, by name.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                  reason="needs 2 or 4 GPUs: TP, PP and DP layouts against one GPU")]


def test_layouts_match_one_gpu_and_the_estimator(tmp_path):
    gpus = torch.cuda.device_count()
    out = Path(os.environ.get("FAMTRON_PARITY_OUT") or tmp_path)
    steps = os.environ.get("FAMTRON_PARITY_STEPS", "20")
    names = os.environ.get("FAMTRON_PARITY_CELLS", "").split() or None
    lr = os.environ.get("FAMTRON_PARITY_LR")  # default: parallel_parity's 3e-4
    cell_args = ["--steps", steps] + (["--lr", lr] if lr else []) + os.environ.get("FAMTRON_PARITY_ARGS", "").split()
    paths = run_suite(out, gpus, serial=False, timeout=420, cell_args=cell_args, names=names)
    expected = [c.name for c in CELLS if c.gpus <= gpus and (names is None or c.name in names)]
    assert sorted(p.stem for p in paths) == sorted(expected), f"cells without a result: see the logs in {out}"
    rows = compare(paths)
    print_table(rows)
    for row in rows:
        assert row["parity_ok"], f"{row['layout']}: {row['failed']} beyond their bounds: {row['diffs']}"
        assert row["estimate_ok"], (f"{row['layout']}: estimate {row['estimate_gib']:.1f} GiB vs measured "
                                    f"{row['peak_gib']:.1f} GiB")
