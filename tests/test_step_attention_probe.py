"""benchmarks/step_attention_probe.py (issue 13): the `deferred` backward of the scan's attention (dQ and
the FAM rows' dK, dV per step from flash's kept log-sum-exp; every block's rows after the loop, batched)
gives today's gradients. Here in fp32 on CPU against the full backward of the matrix products
(model/scan_step.py `_attend_backward`), with grouped queries; the GPU's times and its bf16 agreement
are the probe's to print."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import step_attention_probe as probe
from model import load_model_args

ARGS = dict(block_size=16, fam_len=4)  # tiny: 4 heads in 2 groups, head size 32


def _results(variant: str, blocks=probe.block_rows_backward) -> dict:
    torch.manual_seed(0)
    layer = probe.Layer(load_model_args("tiny", **ARGS), seq=48, micro_batch=2, device="cpu", dtype=torch.float32)
    layer.flash() if variant == "flash" else layer.deferred(blocks=blocks)
    return layer.results()


def test_deferred_block_rows_give_the_full_backwards_gradients():
    """Every output of the deferred backward (dQ, the FAM rows' and the block rows' dK and dV, for 3
    blocks of 2 sequences) equals the full backward's within fp32 rounding."""
    want, got = _results("flash"), _results("deferred")
    for name, x in want.items():
        assert (got[name] - x).abs().max() <= 1e-5 * x.abs().max(), name


def test_block_rows_normalised_without_the_fam_keys_go_red():
    """The block rows' probabilities must use the whole softmax (flash's log-sum-exp over F + C keys):
    a softmax over the block rows alone, the natural slip when they are computed apart, moves them."""
    def own_softmax(d_ctx, q, keys, values, ctx, lse, n_f, scale):
        kh = keys[:, n_f:].permute(0, 2, 3, 1, 4)
        own = torch.logsumexp(torch.matmul(q, kh.transpose(-1, -2)) * scale, dim=-1)
        return probe.block_rows_backward(d_ctx, q, keys, values, ctx, own, n_f, scale)

    want, got = _results("flash"), _results("deferred", blocks=own_softmax)
    assert (got["d_values"] - want["d_values"]).abs().max() > 1e-2 * want["d_values"].abs().max()


def test_the_command_prints_a_row_per_cell_and_writes_them(tmp_path, capsys):
    rows = probe.main(["--config", "tiny", "--device", "cpu", "--seq-lens", "64", "--micro-batch", "1", "2",
                       "--warmup", "1", "--iters", "1", "--json", str(tmp_path / "rows.json")])
    assert [(r["seq_len"], r["micro_batch"], r["blocks"]) for r in rows] == [(64, 1, 1), (64, 2, 1)]
    assert all(r["max_rel_diff"] < 1e-5 for r in rows)
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert "| 64 | 2 | 1 |" in capsys.readouterr().out


def test_a_config_without_fam_and_a_missing_gpu_are_named(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        probe.main(["--config", "bswa-tiny", "--device", "cpu"])
    assert "--config bswa-tiny: no FAM rows" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here"):
        probe.main(["--config", "tiny"])


def phase_parses(module: str, main, monkeypatch) -> None:
    """The fam_speed.sh phase that runs `python3 -m benchmarks.<module>`: its command line, the shell variables
    filled in, parses and stops only for want of a GPU."""
    import re
    from pathlib import Path

    script = (Path(__file__).resolve().parent.parent / "benchmarks" / "fam_speed.sh").read_text()
    (command,) = re.findall(rf"python3 -m benchmarks\.{module} (.*?)>", script.replace("\\\n", " "))
    argv = re.sub(r'"\$OUT/([\w.]+)"', r"runs/x/\1", command).split()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here"):
        main(argv)


def test_fam_speed_shs_attention_phase_parses(monkeypatch):
    phase_parses("step_attention_probe", probe.main, monkeypatch)
