"""benchmarks/micro_chunk_step.py on CPU: the cell that `python -m benchmarks.train_step
--micro-chunk-len N --mode ...` times on a GPU runs end to end in both modes and records the
fields of train_step.json plus mode, micro_chunk_len and the estimate. The GPU figures
themselves come from the GPU run (not made by this branch)."""

from __future__ import annotations

import math

import pytest

import argparse

from benchmarks.micro_chunk_step import acceptance_lines, choose_recompute, pick_recompute, run_chunk_cell

TRAIN_STEP_FIELDS = {"tokens_per_s", "tflops", "mfu", "peak_gib", "loss", "recompute"}


@pytest.mark.parametrize("mode", ["exact", "truncated"])
def test_a_micro_chunk_cell_runs_on_cpu_and_records_its_fields(mode):
    row = run_chunk_cell("tiny", 512, 128, mode, 256, recompute=False, steps=1, device="cpu")
    assert TRAIN_STEP_FIELDS | {"mode", "micro_chunk_len", "estimate_gib"} <= row.keys()
    assert (row["mode"], row["micro_chunk_len"]) == (mode, 128)
    assert row["tokens_per_s"] > 0 and math.isfinite(row["loss"]) and row["estimate_gib"] > 0


def test_recompute_is_chosen_by_whether_the_estimate_fits():
    # fam-1b at 1M tokens, exact micro-chunks of 16k: without recompute one 16k chunk's layers alone
    # exceed a small card; a huge one fits without it.
    assert choose_recompute("fam-1b", 1048576, 16384, "exact", 32000, gpu_gib=80.0)
    assert not choose_recompute("fam-1b", 1048576, 16384, "exact", 32000, gpu_gib=10_000.0)


def test_recompute_on_or_off_is_taken_as_given_and_auto_asks_the_estimate():
    opts = argparse.Namespace(recompute="auto", seq_lens=[8192, 1048576], micro_chunk_len=16384, vocab_size=32000)
    assert pick_recompute(opts, "fam-1b", "exact", gpu_gib=80.0)  # the estimate at 1M does not fit 80 GiB
    opts.recompute = "off"
    assert not pick_recompute(opts, "fam-1b", "exact", gpu_gib=80.0)
    opts.recompute, opts.seq_lens = "on", [8192]
    assert pick_recompute(opts, "fam-1b", "exact", gpu_gib=10_000.0)


def test_acceptance_lines_compare_the_rows_the_issue_names():
    def row(mode, seq, peak, speed, est):
        return {"config": "fam-1b", "mode": mode, "seq_len": seq, "peak_gib": peak, "tokens_per_s": speed,
                "estimate_gib": est}

    rows = [row("truncated", 8192, 20.0, 30e3, 21.0), row("truncated", 1048576, 21.0, 28.5e3, 21.0),
            row("exact", 65536, 25.0, 22e3, 25.0), row("exact", 1048576, 45.0, 21e3, 40.5)]
    (line,) = acceptance_lines(rows)
    assert "truncated peak 1.05x of 8k" in line and "tokens/s 0.95x" in line
    assert "exact peak 1.80x of 64k" in line and "exact tokens/s 0.74x truncated" in line
    assert "estimate within 10% of every peak" in line
