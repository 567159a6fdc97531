"""The FAM scan kept out of layer recompute (model/scan_stash.py, ModelArgs.recompute_fam_scan=False),
on the fast scan's CPU path (fresh buffers, and the static buffers the GPU's CUDA graphs replay):
the same logits, returned state and every gradient as recomputing the scan, bit for bit (the
recompute repeats the same fp32 ops), with the scan's forward loop run once per layer call instead
of twice. A stash shared by every layer (each recompute taking another layer's scan) goes red."""

from __future__ import annotations

import pytest
import torch

import model.fast_scan as fast_scan_module
import model.scan_graphs as scan_graphs
import model.scan_stash as scan_stash
from model import build_model
from tests.test_reference import small_args
from tests.test_scan import _run, _tokens, rel_diff, use_fast_scan


def _keep_vs_recompute(monkeypatch) -> tuple[dict, dict]:
    """rel. difference of each output and gradient, and the forward loops each way ran."""
    loops = []
    forward_loop = fast_scan_module._forward_loop
    monkeypatch.setattr(fast_scan_module, "_forward_loop", lambda *a: loops.append(1) or forward_loop(*a))
    runs, counts = {}, {}
    for keep in (False, True):
        loops.clear()
        args = small_args(num_layers=3, recompute=True, recompute_fam_scan=not keep)
        runs[keep] = _run(args, True, 37, with_state=True)
        counts[keep] = len(loops)
    recomputed, kept = runs[False], runs[True]
    diffs = {"logits": rel_diff(kept["logits"], recomputed["logits"])}
    for i, (a, b) in enumerate(zip(kept["state"].layers, recomputed["state"].layers)):
        diffs[f"state.{i}.fam"] = rel_diff(a.fam, b.fam)
    diffs.update({name: rel_diff(kept["grads"][name], g) for name, g in recomputed["grads"].items()})
    return diffs, counts


@pytest.mark.parametrize("buffers", ["cuda", "always"], ids=["fresh buffers", "static buffers"])
def test_a_recompute_that_keeps_the_scan_equals_one_that_recomputes_it_and_runs_it_once(buffers, monkeypatch):
    monkeypatch.setattr(scan_graphs, "MODE", buffers)  # "cuda" on this CPU: fresh buffers per call
    scan_graphs.clear()
    diffs, loops = _keep_vs_recompute(monkeypatch)
    scan_graphs.clear()
    assert len(diffs) > 20 and max(diffs.values()) == 0.0, {n: d for n, d in diffs.items() if d}
    # 3 layers x 2 chained calls: each scan runs in the forward and again in the recompute, or once
    assert loops == {False: 12, True: 6}


def test_a_stash_shared_by_every_layer_goes_red(monkeypatch):
    """Backward recomputes the layers last to first: one stash for all of them hands layer 2 the scan
    of layer 0 (one model call, so every entry has the same shapes and only the values tell)."""
    shared = scan_stash.Stash()
    monkeypatch.setattr(scan_stash, "contexts", lambda: (scan_stash._using(shared, False),
                                                         scan_stash._using(shared, True)))
    grads = {}
    for keep in (False, True):
        torch.manual_seed(0)
        model = build_model(small_args(num_layers=3, recompute=True, recompute_fam_scan=not keep))
        use_fast_scan(model, True)
        tokens = _tokens(2, 37)
        model(tokens, labels=tokens).loss.backward()
        grads[keep] = {name: p.grad for name, p in model.named_parameters()}
    worst = max(rel_diff(grads[True][name], g) for name, g in grads[False].items())
    assert worst > 1e-3, worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_what_the_stash_keeps_is_what_the_estimator_counts(dtype, monkeypatch):
    """pipeline/memory/terms.py scan_kept_bytes against the tensors every layer's stash holds between
    the forward and the backward (the fast scan on CPU: fresh buffers, the sizes the GPU's static
    ones clone), fp32 and bf16, a partial last block included."""
    from pipeline.memory.terms import element_bytes, scan_kept_bytes
    from tests.test_memory import FP32, _small

    made, real = [], scan_stash.Stash
    monkeypatch.setattr(scan_stash, "Stash", lambda: made.append(real()) or made[-1])
    args = _small(recompute=True, recompute_fam_scan=False)
    torch.manual_seed(0)
    model = build_model(args, params_dtype=dtype, device="cpu")
    use_fast_scan(model, True)
    tokens = torch.randint(0, args.vocab_size, (2, 101))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for stash in made
                for outputs, saved, prompt_kv in stash.entries for t in (*outputs, *saved, *prompt_kv)}
    e = FP32 if dtype == torch.float32 else element_bytes("bf16-zero", "bf16")
    assert len(made) == args.num_layers
    assert sum(storages.values()) == args.num_layers * scan_kept_bytes(args, 100, 2, bytes_=e)
    loss.backward()
    assert all(not stash.entries for stash in made)  # each recompute took its layer's scan back
