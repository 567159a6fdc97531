"""benchmarks/step_backends_probe.py (issue 13): the scan step's attention timed by SDPA kernel. On CPU
the math kernel runs the probe's whole path (blocks, the per-block forward and backward, the checks);
its gradients are checked here against autograd through the plain softmax, so the probe's copies of
them (a transposed dk, a missed block) cannot pass for a kernel's."""

from __future__ import annotations

import json

import torch

from benchmarks import step_backends_probe as probe
from model import load_model_args

ARGS = load_model_args("tiny", block_size=16, fam_len=4)


def test_each_blocks_outputs_and_gradients_are_the_plain_softmaxs():
    torch.manual_seed(0)
    x = probe.blocks(ARGS, seq=40, micro_batch=2, device="cpu", dtype=torch.float64)
    run, out = probe.layer_run(probe.BACKENDS["math"], x)
    run()
    T, d = x["q"].shape[0], x["q"].shape[-1]
    assert T == 3
    for t in range(T):
        q = x["q"][t].clone().requires_grad_()
        k, v = (x[n][t].permute(1, 2, 0, 3).clone().requires_grad_() for n in ("keys", "values"))
        o = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1) @ v
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), x["d_out"][t])
        torch.testing.assert_close(out["out"][t], o)
        torch.testing.assert_close(out["dq"][t], dq)
        torch.testing.assert_close(out["dk"][t], dk.permute(2, 0, 1, 3))
        torch.testing.assert_close(out["dv"][t], dv.permute(2, 0, 1, 3))


def test_the_command_prints_a_row_per_cell_and_writes_them(tmp_path, capsys):
    rows = probe.main(["--config", "tiny", "--device", "cpu", "--seq-lens", "64", "--micro-batch", "1", "2",
                       "--warmup", "1", "--iters", "1", "--json", str(tmp_path / "rows.json")])
    assert [(r["seq_len"], r["micro_batch"], r["blocks"]) for r in rows] == [(64, 1, 1), (64, 2, 1)]
    assert all(r["math"]["max_rel_diff"] == 0 and r["math"]["us_per_step"] > 0 for r in rows)
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert "| 64 | 2 | 1 | " in capsys.readouterr().out


def test_a_kernel_that_refuses_the_inputs_is_reported_not_fatal(capsys):
    """On CPU the cuDNN kernel is not there: its cell says so and the math one still runs."""
    row = probe.probe(ARGS, 32, 1, "cpu", 1, 1, backends=("cudnn", "math"))
    assert "error" in row["cudnn"] and row["math"]["us_per_step"] > 0
    probe.print_table("tiny", [row], "cpu")
    assert "| unsupported | " in capsys.readouterr().out


def test_fam_speed_shs_backends_phase_parses(monkeypatch):
    from tests.test_step_attention_probe import phase_parses

    phase_parses("step_backends_probe", probe.main, monkeypatch)
