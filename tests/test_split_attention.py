"""The block attention split in a window and a FAM part merged by log-sum-exp
(model/split_attention.py; on GPU the scan runs beside the window part) against the one-call
attention `attend_blocks` (model/attention.py), on CPU: the parts alone in fp64 (outputs and the
gradient of every input), and whole models in fp32 (logits, returned state, every gradient) with
the eager and the fast scan, passed-in state, memory and a partial last block. A FAM part that
shows block t its own F_t, or a merge that averages instead of weighting by lse, goes red."""

from __future__ import annotations

import pytest
import torch

import model.split_attention as split_attention
from model.attention import _from_bnsd, _to_bnsd
from model.masks import BlockLayout
from tests.test_reference import small_args
import tests.test_scan as test_scan
from tests.test_scan import RTOL, _run, rel_diff, use_fast_scan

LAYOUT = BlockLayout(mem_len=16, seq_len=37, block_size=8, fam_len=4, mem_blocks=2)  # T = 5, R = 128


def _inputs(layout: BlockLayout, b=2, n=4, g=2, d=8):
    gen = torch.Generator().manual_seed(0)
    new = lambda rows, heads: torch.randn(rows, b, heads, d, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(q=new(layout.seq_len, n), mem_k=new(layout.mem_len, g), mem_v=new(layout.mem_len, g),
                fam_k=new(layout.fam_rows, g), fam_v=new(layout.fam_rows, g), k=new(layout.seq_len, g),
                v=new(layout.seq_len, g))


def _whole(attention, x: dict, layout):
    keys = torch.cat([x["mem_k"], x["fam_k"], x["k"]])
    values = torch.cat([x["mem_v"], x["fam_v"], x["v"]])
    return attention.attend_blocks(x["q"], keys, values, layout)


def _split(attention, x: dict, layout, fam_layout=None, merge=split_attention.merge):
    window = attention.attend_window(x["q"], x["mem_k"], x["mem_v"], x["k"], x["v"], layout)
    fam_layout = fam_layout or split_attention.parts(layout)[1]
    fam = split_attention.attend(_to_bnsd(x["q"]), _to_bnsd(x["fam_k"]), _to_bnsd(x["fam_v"]), fam_layout)
    return _from_bnsd(merge(*window, *fam))


def _outputs_and_grads(fn, x: dict) -> list[torch.Tensor]:
    leaves = {name: t.clone().requires_grad_() for name, t in x.items()}
    out = fn(leaves)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return [out.detach()] + [leaves[name].grad for name in x]


def _max_rel(got, expected) -> float:
    return max(rel_diff(a, b) for a, b in zip(got, expected))


@pytest.fixture(scope="module")
def attention():
    from model.attention import FAMSelfAttention

    return FAMSelfAttention.__new__(FAMSelfAttention)  # attend_* use no weights


def test_window_and_fam_parts_merged_by_lse_equal_the_one_call_attention(attention):
    x = _inputs(LAYOUT)
    whole = _outputs_and_grads(lambda t: _whole(attention, t, LAYOUT), x)
    split = _outputs_and_grads(lambda t: _split(attention, t, LAYOUT), x)
    assert _max_rel(split, whole) < 1e-12

    averaged = lambda ow, lw, of, lf: (ow + of) / 2  # noqa: E731
    assert _max_rel(_outputs_and_grads(lambda t: _split(attention, t, LAYOUT, merge=averaged), x), whole) > 1e-2


def test_a_fam_part_that_shows_each_block_its_own_new_fam_goes_red(attention, monkeypatch):
    x = _inputs(LAYOUT)
    whole = _outputs_and_grads(lambda t: _whole(attention, t, LAYOUT), x)
    C, F = LAYOUT.block_size, LAYOUT.fam_len
    monkeypatch.setattr(split_attention.FamPartLayout, "mask_mod", lambda self: (
        lambda b, h, q, kv: kv.div(F, rounding_mode="floor") == q.div(C, rounding_mode="floor") + 1))
    assert _max_rel(_outputs_and_grads(lambda t: _split(attention, t, LAYOUT), x), whole) > 1e-2


def _split_runs(args, fast: bool, seq: int, monkeypatch) -> dict:
    runs = {}
    for split in (False, True):
        def use(model, fast_scan, split=split):
            use_fast_scan(model, fast_scan)
            for layer in model.layers:
                layer.split_attention = split

        with monkeypatch.context() as patch:
            patch.setattr(test_scan, "use_fast_scan", use)
            runs[split] = _run(args, fast, seq, with_state=True)
    return runs


@pytest.mark.parametrize("fast", [False, True], ids=["eager scan", "fast scan"])
def test_a_model_with_the_split_attention_equals_the_one_call_model(fast, monkeypatch):
    """Two chained calls with memory, a passed-in state and a partial last block (tests/test_scan.py _run)."""
    runs = _split_runs(small_args(num_layers=3), fast, 37, monkeypatch)
    one, split = runs[False], runs[True]
    diffs = {"logits": rel_diff(split["logits"], one["logits"])}
    for i, (a, b) in enumerate(zip(split["state"].layers, one["state"].layers)):
        diffs[f"state.{i}.fam"] = rel_diff(a.fam, b.fam)
    diffs.update({name: rel_diff(split["grads"][name], g) for name, g in one["grads"].items()})
    assert len(diffs) > 20
    assert max(diffs.values()) <= RTOL, {n: d for n, d in diffs.items() if d > RTOL}
