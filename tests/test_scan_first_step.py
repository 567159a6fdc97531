"""model/scan_first_step.py: block 0's step and the prompt step as one (model/fast_scan.py
MERGED_FIRST_STEP), against the eager scan: outputs, the returned state and every gradient, as
tests/test_scan.py checks the separate steps; over the static buffers too; a merged backward that
forgets one of its two paths goes red."""

from __future__ import annotations

import pytest

import model.fast_scan as fast_scan_module
import model.scan_first_step as scan_first_step
import model.scan_graphs as scan_graphs
from tests.test_reference import small_args
from model import build_model
from tests.test_scan import RTOL, _differences, _tokens, rel_diff, use_fast_scan

CASES = {
    "whole blocks": ({}, 40),
    "partial last block": ({}, 37),
    "one partial block": ({}, 5),  # block 0 (C = 8) is the partial one: its key bias in the merged step
    "multi-query": ({"num_query_groups": 1}, 37),
    "FAM as long as a block": ({"fam_len": 8}, 37),
    "activation recompute": ({"recompute": True}, 37),
}


@pytest.fixture
def merged(monkeypatch):
    monkeypatch.setattr(fast_scan_module, "MERGED_FIRST_STEP", True)
    calls = []
    for name in ("step_forward_first", "step_backward_first"):
        fn = getattr(fast_scan_module, name)
        monkeypatch.setattr(fast_scan_module, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    return calls


@pytest.mark.parametrize("case", CASES)
def test_the_merged_first_step_matches_the_eager_scan(case, merged):
    over, seq = CASES[case]
    args = small_args(num_layers=3, **over)
    diffs = _differences(args, seq) if seq > 2 * args.block_size else _one_block(args, seq)
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert {"step_forward_first", "step_backward_first"} <= set(merged) and len(diffs) > 20 and not bad, bad


def _one_block(args, seq):
    """_differences' two chained calls need more than two blocks; one call over one partial block instead."""
    found = []
    for fast in (False, True):
        model = build_model(args, seed=1234)
        use_fast_scan(model, fast)
        tokens = _tokens(2, seq)
        out = model(tokens, labels=tokens)
        out.loss.backward()
        found.append((out.logits, {n: p.grad for n, p in model.named_parameters()}))
    (eager_logits, eager), (fast_logits, fast) = found
    return {"logits": rel_diff(fast_logits, eager_logits), **{n: rel_diff(fast[n], g) for n, g in eager.items()}}


def test_the_merged_first_step_over_the_static_buffers(merged, monkeypatch):
    monkeypatch.setattr(scan_graphs, "MODE", "always")
    scan_graphs.clear()
    try:
        diffs = _differences(small_args(num_layers=2), 37)
    finally:
        scan_graphs.clear()
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert merged and not bad, bad


@pytest.mark.parametrize("broken", ["the prompt's query gradient dropped", "the prompt slot's QKV gradient kept"])
def test_a_merged_backward_missing_a_path_goes_red(broken, merged, monkeypatch):
    if broken == "the prompt's query gradient dropped":
        rope_backward = scan_first_step._rope_backward
        seen = []

        def first_only(dy, cos, sin):  # the second query term (the prompt's) comes back as zero
            seen.append(1)
            out = rope_backward(dy, cos, sin)
            return out * 0 if len(seen) % 3 == 2 else out
        monkeypatch.setattr(scan_first_step, "_rope_backward", first_only)
    else:  # the prompt slot gets the QKV output gradient too: the weight-gradient GEMM counts it twice
        keep = scan_first_step._keep
        monkeypatch.setattr(scan_first_step, "_keep", lambda out, *values: keep(
            out, *(values[:1] if values[0] is None or values[0].abs().sum() > 0 else (values[0] + 1,)), *values[1:]))
    diffs = _differences(small_args(num_layers=2), 37)
    assert max(diffs.values()) > 50 * RTOL, diffs
