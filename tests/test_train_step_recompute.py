"""`python -m benchmarks.train_step --recompute`, one setting per sequence length, run with faked cells (the
timing itself needs a GPU): each length's cells with their own setting, and `auto`'s fallback."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks import train_step

ROOT = Path(__file__).resolve().parent.parent


def test_each_length_runs_with_its_own_recompute_setting(monkeypatch, tmp_path, capsys):
    """--recompute off on: every config at the first length without layer recompute, at the second with
    it (the cells themselves faked: timing needs a GPU); auto tries without and falls back on running
    out of memory, as session 22's 32k bswa-1b row did not, so it ran without where fam-1b could not."""
    ran = []

    def fake_cell(name, seq, vocab, recompute, *rest):
        ran.append((name, seq, recompute))
        if name == "fam-1b" and seq == 32768 and not recompute:
            raise torch.OutOfMemoryError("fake")
        return dict(tokens_per_s=1e4, tflops=100.0, mfu=0.1, peak_gib=1.0, recompute=recompute)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(train_step, "run_cell", fake_cell)
    monkeypatch.setattr(train_step, "release_cell", lambda before: 0.0)
    argv = ["--configs", "fam-1b", "bswa-1b", "--seq-lens", "8192", "32768", "--results-dir", str(tmp_path)]
    _main_runs([*argv, "--recompute", "off", "on"], monkeypatch)
    assert ran == [("fam-1b", 8192, False), ("bswa-1b", 8192, False), ("fam-1b", 32768, True),
                   ("bswa-1b", 32768, True)]
    ran.clear()
    _main_runs([*argv, "--recompute", "auto"], monkeypatch)
    assert ran == [("fam-1b", 8192, False), ("bswa-1b", 8192, False), ("fam-1b", 32768, False),
                   ("fam-1b", 32768, True), ("bswa-1b", 32768, False)]


def _main_runs(argv: list[str], monkeypatch) -> None:
    from benchmarks import micro_chunk_step
    from model import compile_limits, fast_scan, mlp, rope, scan_slots, scan_step

    # main sets these from its options (apply_kernel_options): put back after the test
    for module, names in ((fast_scan, ("COMPILE_MODE", "WEIGHTS_IN_PLACE", "HOLD_BLOCKS")),
                          (scan_slots, ("MAX_SLOTS",)), (scan_step, ("FLASH", "FUSED_KERNEL")), (rope, ("FUSED",)),
                          (mlp, ("FUSED",)),
                          (compile_limits, ("STATIC_SHAPES",)),
                          (micro_chunk_step, ("RECOMPUTE_FAM_SCAN", "OVERLAP_FAM_SCAN"))):
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train_step", *argv])
    train_step.main()


def test_each_row_is_compared_with_bswa_at_its_own_micro_batch_and_recompute(monkeypatch, capsys):
    """One length at two micro-batches (issue 13's 8k rows at 4 and 6): each fam row's "x bswa" is
    against the bswa row of the same micro-batch and recompute, not the last bswa row of the length."""
    from argparse import Namespace

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    base = dict(tflops=250.0, mfu=0.25, peak_gib=40.0, recompute=False)
    rows = [("fam-1b", 8192, dict(base, tokens_per_s=45e3, micro_batch=4)),
            ("bswa-1b", 8192, dict(base, tokens_per_s=50e3, micro_batch=4)),
            ("fam-1b", 8192, dict(base, tokens_per_s=48e3, micro_batch=6)),
            ("bswa-1b", 8192, dict(base, tokens_per_s=60e3, micro_batch=6)),
            ("fam-1b", 8192, dict(base, tokens_per_s=30e3, micro_batch=6, recompute=True)),
            ("bswa-1b", 8192, dict(base, tokens_per_s=40e3, micro_batch=6, recompute=True))]
    train_step.print_table(rows, Namespace(precision="bf16-mixed", vocab_size=32000, profile=False))
    fam = [line.split(" | ")[4] for line in capsys.readouterr().out.splitlines() if line.startswith("| fam-1b")]
    assert fam == ["0.90", "0.80", "0.75"]
