"""benchmarks/fam_floor.py: the arithmetic of FAM's cost floor against BSWA, checked by hand for
fam-1b (18 layers, d=1536, 12 heads of 128, FFN 12288) at 8k tokens."""

from __future__ import annotations

import sys

import pytest

from benchmarks import fam_floor
from benchmarks.fam_floor import floor_row, scan_gemm_flops, scan_weight_bytes
from model import load_model_args
from pipeline.training.flops import flops_per_token

FAM_1B_LAYER_WEIGHTS = 1536 * (12 + 2 * 12) * 128 + 12 * 128 * 1536 + 3 * 1536 * 12288  # QKV, proj, SwiGLU


def test_the_scan_reads_every_layers_weights_per_block_and_prompt_step_both_ways():
    args = load_model_args("fam-1b", vocab_size=32000)
    assert scan_weight_bytes(args, 8192) == 2 * 18 * (8 + 1) * FAM_1B_LAYER_WEIGHTS * 2  # fwd+bwd, T+1 steps, bf16
    assert scan_weight_bytes(args, 8193) == 2 * 18 * (9 + 1) * FAM_1B_LAYER_WEIGHTS * 2  # a partial block is a step


def test_the_scan_gemms_are_the_fam_rows_forward_and_activation_gradients():
    args = load_model_args("fam-1b", vocab_size=32000)
    assert scan_gemm_flops(args, 8192) == 4 * 18 * FAM_1B_LAYER_WEIGHTS * 8 * 64  # 2 fwd + 2 dgrad per weight and row
    assert scan_gemm_flops(args, 8193) == 4 * 18 * FAM_1B_LAYER_WEIGHTS * 9 * 64


def test_floor_counts_the_scan_gemms_once_and_rises_with_the_micro_batch():
    args = load_model_args("fam-1b", vocab_size=32000)
    one = floor_row(args, 8192, 1, 4.8, 989e12, 0.42, bswa_tokens_per_s=49_700)
    two = floor_row(args, 8192, 2, 4.8, 989e12, 0.42)
    assert one.bswa_ms == pytest.approx(8192 / 49_700 * 1e3)
    assert one.scan_ms == pytest.approx(scan_weight_bytes(args, 8192) / 4.8e12 * 1e3)  # reads, not FLOPs, bind
    assert 0.94 < one.flop_ceiling < 0.95  # F/C = 6.25 % more GEMM rows, plus their attention
    fam = flops_per_token(args, 8192)
    bswa = flops_per_token(load_model_args("bswa-1b", vocab_size=32000), 8192)
    outside = (fam - 4 * 18 * FAM_1B_LAYER_WEIGHTS * 512 / 8192) / bswa  # the FAM rows' weight gradients, attention
    assert one.floor_ms == pytest.approx(one.bswa_ms * outside + one.scan_ms)
    assert one.floor == pytest.approx(one.bswa_ms / one.floor_ms) and 0.92 < one.floor < 0.93
    counted_twice = one.bswa_ms / (one.bswa_ms / one.flop_ceiling + one.scan_ms)  # stop 25's model: 0.898
    assert counted_twice < 0.9 < one.floor
    assert one.slack_ms == pytest.approx(one.bswa_ms / 0.9 - one.floor_ms)
    assert one.floor < two.floor < 1 / outside  # the weight reads serve both sequences; FAM's other FLOPs stay


def test_cli_refuses_a_dense_config_mismatched_measurements_and_non_positive_values(monkeypatch, capsys):
    for argv, says in ((["--config", "bswa-1b"], "not a FAM config"),
                       (["--seq-lens", "8192", "32768", "--bswa-tokens-per-s", "1"], "one per sequence"),
                       (["--config", "nonesuch"], "unknown config 'nonesuch'"),
                       (["--micro-batch", "1", "0"], "--micro-batch 1 0: every value must be > 0"),
                       (["--seq-lens", "8192", "--bswa-tokens-per-s", "0"], "--bswa-tokens-per-s 0.0: every value"),
                       (["--bandwidth-tbs", "-1"], "--bandwidth-tbs -1.0: every value must be > 0")):
        monkeypatch.setattr(sys, "argv", ["fam_floor", *argv])
        with pytest.raises(SystemExit) as done:
            fam_floor.main()
        assert done.value.code == 2 and says in capsys.readouterr().err


def test_measured_bswa_speed_is_taken_at_the_one_micro_batch_given(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fam_floor", "--seq-lens", "8192", "--micro-batch", "2",
                                      "--bswa-tokens-per-s", "54341"])
    fam_floor.main()
    row = capsys.readouterr().out.splitlines()[-1].split(" | ")
    assert row[1] == "2" and row[6] == f"{2 * 8192 / 54341 * 1e3:.0f} ms", row  # measured, not the default MFU
