"""benchmarks/micro_chunk_step.py on CPU: the cell that `python -m benchmarks.train_step
--micro-chunk-len N --mode ...` times on a GPU runs end to end in both modes and records the
fields of train_step.json plus mode, micro_chunk_len, precision and the estimate, in the training
step's precision: bf16-mixed (bf16 weights, fp32 masters and gradient buffers, CPU autocast in
bf16), the default and what the GPU rows measure, and bf16-autocast (fp32 weights under CPU
autocast); both run on CPU, so the CPU cell runs the GPU's optimizer and weight dtypes. The GPU
figures themselves come from the GPU run (not made by this branch)."""

from __future__ import annotations

import math

import pytest

import argparse

import torch

from benchmarks import micro_chunk_step
from benchmarks.micro_chunk_step import acceptance_lines, choose_recompute, estimate_gib, pick_recompute, run_chunk_cell
from benchmarks.step_optimizer import build_step_optimizer
from model import build_model, load_model_args
from pipeline.training.precision import MixedPrecisionOptimizer

TRAIN_STEP_FIELDS = {"tokens_per_s", "tflops", "mfu", "peak_gib", "loss", "recompute"}


@pytest.mark.parametrize("mode, precision", [("exact", "bf16-mixed"), ("truncated", "bf16-mixed"),
                                             ("truncated", "bf16-autocast")])
def test_a_micro_chunk_cell_runs_on_cpu_and_records_its_fields(mode, precision, monkeypatch):
    built = []

    def spy(model, precision):  # the real builder, recording which precision the cell asked for
        built.append(precision)
        return build_step_optimizer(model, precision)

    monkeypatch.setattr(micro_chunk_step, "build_step_optimizer", spy)
    row = run_chunk_cell("tiny", 512, 128, mode, 256, recompute=False, steps=1, device="cpu", precision=precision)
    assert built == [precision]  # the training step's optimizer, as train_step's rows build it
    assert TRAIN_STEP_FIELDS | {"mode", "micro_chunk_len", "estimate_gib", "precision"} <= row.keys()
    assert (row["mode"], row["micro_chunk_len"], row["precision"]) == (mode, 128, precision)
    assert row["tokens_per_s"] > 0 and math.isfinite(row["loss"]) and row["estimate_gib"] > 0
    args = load_model_args("tiny", vocab_size=256, recompute=False)
    assert row["estimate_gib"] == estimate_gib(args, 512, 128, mode, precision)  # the estimate of the step measured


def test_cells_build_the_training_steps_optimizer_for_their_precision():
    """bf16-mixed: bf16 weights, fp32 masters and gradient buffers (the ones allocated once, which
    the micro-chunk rows measure); bf16-autocast: AdamW over the fp32 weights."""
    model = build_model(load_model_args("tiny"), device="cpu")
    mixed = build_step_optimizer(model, "bf16-mixed")
    assert isinstance(mixed, MixedPrecisionOptimizer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in mixed.buffers} == {torch.float32}
    model = build_model(load_model_args("tiny"), device="cpu")
    plain = build_step_optimizer(model, "bf16-autocast")
    assert isinstance(plain, torch.optim.AdamW) and {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="bf16-mixed, bf16-autocast, fp32"):
        build_step_optimizer(model, "fp16")


def test_the_estimate_follows_the_precision_and_bf16_mixed_holds_its_buffers_from_one_micro_chunk_on():
    """fam-1b, 8k micro-chunks: the one-micro-chunk 8k row and the 1M truncated row. Under
    bf16-mixed the fp32 gradient buffers are counted in both (allocated once); under autocast the
    fp32 .grad tensors count only from the second micro-chunk on (they persist between them)."""
    args = load_model_args("fam-1b", vocab_size=32000, recompute=False)
    ratio = {p: estimate_gib(args, 1048576, 8192, "truncated", p) / estimate_gib(args, 8192, 8192, "truncated", p)
             for p in ("bf16-mixed", "bf16-autocast")}
    # the fp32 gradients of 1.29B parameters are 4.8 GiB: the autocast rows differ by about that, the bf16-mixed
    # rows by what truncated micro-chunks keep besides them (the passed state's K/V among the keys)
    assert ratio["bf16-autocast"] > 1.1 > 1.05 > ratio["bf16-mixed"], ratio


def test_recompute_is_chosen_by_whether_the_estimate_fits():
    # fam-1b at 1M tokens, exact micro-chunks of 16k: without recompute one 16k chunk's layers alone
    # exceed a small card (the estimate is 73.6 GiB + the 4 GiB allowance); a huge one fits without it.
    assert choose_recompute("fam-1b", 1048576, 16384, "exact", 32000, gpu_gib=40.0)
    assert not choose_recompute("fam-1b", 1048576, 16384, "exact", 32000, gpu_gib=10_000.0)


def test_recompute_on_or_off_is_taken_as_given_and_auto_asks_the_estimate():
    opts = argparse.Namespace(recompute="auto", seq_lens=[8192, 1048576], micro_chunk_len=16384, vocab_size=32000,
                              precision="bf16-mixed")
    assert pick_recompute(opts, "fam-1b", "exact", gpu_gib=40.0)  # the estimate at 1M does not fit 40 GiB
    opts.recompute = "off"
    assert not pick_recompute(opts, "fam-1b", "exact", gpu_gib=40.0)
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


def test_a_cell_that_leaves_memory_allocated_is_reported_in_its_row(capsys, monkeypatch):
    """release_cell measures what a finished cell left allocated (the leak that once carried 21.6 GiB
    from cell to cell); `allocated` stands in for torch.cuda.memory_allocated on this CPU machine."""
    gib = 2**30
    for module in (micro_chunk_step.rope, micro_chunk_step.mlp):  # megatron's eager ops: no note
        monkeypatch.setattr(module, "FUSED", False)
    clean = micro_chunk_step.release_cell(10 * gib, allocated=lambda: 10 * gib + 4096)
    flash = {"scan_compile_mode": "combo-kernels", "scan_attention": "flash", "scan_blocks": "held"}  # always noted
    assert micro_chunk_step.row_notes(clean) == flash and "WARNING" not in capsys.readouterr().out
    left = micro_chunk_step.release_cell(10 * gib, allocated=lambda: 31 * gib + gib // 2)
    assert micro_chunk_step.row_notes(left) == {"leaked_gib": 21.5, **flash}
    assert "left 21.5 GiB allocated" in capsys.readouterr().out
    monkeypatch.setattr(micro_chunk_step.fast_scan, "COMPILE_MODE", "max-autotune-no-cudagraphs")
    autotuned = {**flash, "scan_compile_mode": "max-autotune-no-cudagraphs"}
    assert micro_chunk_step.row_notes(clean) == autotuned
    monkeypatch.setattr(micro_chunk_step.mlp, "FUSED", True)  # the default: compiled ops, noted
    assert micro_chunk_step.row_notes(clean) == {"fused_ops": True, **autotuned}
    monkeypatch.setattr(micro_chunk_step.compile_limits, "STATIC_SHAPES", 0)
    assert micro_chunk_step.row_notes(clean) == {"fused_ops": True, "fused_op_shapes": "dynamic", **autotuned}
    assert micro_chunk_step.cell_model_args("fam-1b", 32000, True).recompute_fam_scan is False  # the default
    monkeypatch.setattr(micro_chunk_step, "RECOMPUTE_FAM_SCAN", True)  # --recompute-fam-scan on: noted, in every model
    assert micro_chunk_step.row_notes(clean)["recompute_fam_scan"] is True
    assert micro_chunk_step.cell_model_args("fam-1b", 32000, True).recompute_fam_scan is True
    monkeypatch.setattr(micro_chunk_step, "OVERLAP_FAM_SCAN", False)  # --fam-scan-overlap off
    assert micro_chunk_step.row_notes(clean)["overlap_fam_scan"] is False
    assert micro_chunk_step.cell_model_args("fam-1b", 32000, True).overlap_fam_scan is False
    assert "scan_weights" not in micro_chunk_step.row_notes(clean)  # the default: read in place
    monkeypatch.setattr(micro_chunk_step.fast_scan, "WEIGHTS_IN_PLACE", False)  # --scan-weights copied
    assert micro_chunk_step.row_notes(clean)["scan_weights"] == "copied"
    assert "scan_slots" not in micro_chunk_step.row_notes(clean)  # the default: a slot per call
    monkeypatch.setattr(micro_chunk_step.scan_slots, "MAX_SLOTS", 0)  # --scan-slots off
    assert micro_chunk_step.row_notes(clean)["scan_slots"] == "off"
    monkeypatch.setattr(micro_chunk_step.scan_step, "FUSED_KERNEL", "cudnn")  # --scan-attention cudnn
    assert micro_chunk_step.row_notes(clean)["scan_attention"] == "cudnn"
    monkeypatch.setattr(micro_chunk_step.scan_step, "FLASH", False)  # --scan-attention matmul
    assert micro_chunk_step.row_notes(clean)["scan_attention"] == "matmul"
    assert "scan_first_step" not in micro_chunk_step.row_notes(clean)  # the default: separate
    monkeypatch.setattr(micro_chunk_step.fast_scan, "MERGED_FIRST_STEP", True)  # --scan-first-step merged
    assert micro_chunk_step.row_notes(clean)["scan_first_step"] == "merged"
    monkeypatch.setattr(micro_chunk_step.fast_scan, "HOLD_BLOCKS", False)  # --scan-blocks reloaded
    assert micro_chunk_step.row_notes(clean)["scan_blocks"] == "reloaded"
    monkeypatch.setattr(micro_chunk_step.fast_scan, "COMPILE_MODE", None)  # --scan-compile-mode default
    assert micro_chunk_step.row_notes(clean)["scan_compile_mode"] == "default"
