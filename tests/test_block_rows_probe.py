"""benchmarks/block_rows_probe.py (issue 13): the three plans of one layer's matmuls run the rows
they claim, `scan` and `block` the same FLOPs, and every plan's weight gradients are the GEMM over
all its rows. Times are the GPU's to give; here only the plans' arithmetic is checked."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import block_rows_probe as probe
from model import build_model, load_model_args
from pipeline.training.flops import layer_matmul_shapes


def test_the_plans_run_the_block_rows_and_t_times_the_fam_rows_with_a_partial_last_block():
    args = load_model_args("tiny", block_size=16, fam_len=4)
    rows = probe.plan_rows(args, seq=40, micro_batch=2)  # blocks of 16, 16 and 8
    assert rows["whole"] == [80]
    assert rows["scan"] == [80, 8, 8, 8]  # the block rows at once, then F * b rows per block
    assert rows["block"] == [40, 40, 24]  # [F; block] per block, b sequences
    assert sum(rows["scan"]) == sum(rows["block"]) == 80 + 3 * 4 * 2


def test_the_matmul_shapes_are_the_models_weights_and_flops_count_forward_and_both_gradients():
    """pipeline/training/flops.py's shapes, which the probe runs, are the built layer's linear weights
    (a dropped or misshapen matmul goes red), at 6 FLOPs per weight and row."""
    args = load_model_args("tiny")
    layer = build_model(args, device="cpu").layers[0]
    weights = [layer.attention.linear_qkv.weight, layer.attention.linear_proj.weight, layer.mlp.linear_fc1.weight,
               layer.mlp.linear_fc2.weight]
    assert layer_matmul_shapes(args) == [(w.shape[1], w.shape[0]) for w in weights]  # torch keeps [out, in]
    assert probe.plan_flops(args, [3, 4]) == 6 * 7 * sum(w.numel() for w in weights)


@pytest.mark.parametrize("plan", probe.PLANS)
def test_each_plans_weight_gradients_are_the_gemm_over_all_its_rows(plan):
    torch.manual_seed(0)
    args = load_model_args("tiny", block_size=16, fam_len=4)
    rows = probe.plan_rows(args, seq=40, micro_batch=2)[plan]
    run = probe.Plan(args, rows, plan == "scan", "cpu", torch.float64)
    grads = run.run()
    assert [tuple(g.shape) for g in grads] == layer_matmul_shapes(args)
    for x, dy, grad in zip(run.inputs, run.grads, grads):
        assert x.shape[0] == sum(rows)
        torch.testing.assert_close(grad, x.T @ dy)
    assert [s.stop - s.start for s in run.steps] == rows


def test_the_cpu_run_prints_a_row_per_length_and_micro_batch_and_a_bswa_config_is_refused(capsys, tmp_path):
    saved = tmp_path / "not" / "made" / "yet" / "rows.json"  # the folder is made, not the rows lost
    rows = probe.main(["--config", "tiny", "--seq-lens", "40", "--micro-batch", "1", "2", "--device", "cpu",
                       "--warmup", "0", "--iters", "1", "--json", str(saved)])
    assert json.loads(saved.read_text()) == rows
    assert [(r["seq_len"], r["micro_batch"]) for r in rows] == [(40, 1), (40, 2)]
    assert rows[0]["flop_ratio"] == pytest.approx(56 / 40)  # 40 rows plus one block's F = 16 FAM rows
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40 |")]
    assert len(lines) == 2
    with pytest.raises(SystemExit) as stop:
        probe.main(["--config", "bswa-tiny", "--device", "cpu"])
    assert stop.value.code == 2
    assert "--config bswa-tiny: no FAM rows (attention 'fam', fam_len 0)" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("model:\n  hidden_size: [1,\n")
    for config, named in (("nonesuch", "unknown config 'nonesuch'"), (str(tmp_path / "bad.yaml"), "not valid YAML")):
        with pytest.raises(SystemExit) as stop:
            probe.main(["--config", config, "--device", "cpu"])
        assert stop.value.code == 2
        assert f"--config {config}: " in (err := capsys.readouterr().err) and named in err, err
