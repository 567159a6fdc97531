"""The scan's kept-activation slots (model/scan_slots.py) on the CPU path over the static buffers the
GPU's CUDA graphs replay (model/scan_graphs.py MODE "always"): several micro-batches of one layer
in flight, a graph dropped without its backward, a backward with retain_graph, slots running out;
each against the eager per-step scan (model/scan.py), every gradient. The round trip they remove
is counted: 18 copies per call fewer. A slot handed out while still read goes red."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model.fast_scan as fast_scan
import model.scan_graphs as scan_graphs
import model.scan_slots as scan_slots
from model import build_model
from tests.test_reference import small_args
from tests.test_scan import RTOL, _tokens, rel_diff, use_fast_scan

ARGS = small_args(num_layers=2, init_method_std=0.1)
SEQ = 37  # 5 blocks, the last partial


@pytest.fixture(autouse=True)
def static_buffers(monkeypatch):
    monkeypatch.setattr(scan_graphs, "MODE", "always")
    scan_graphs.clear()
    yield
    scan_graphs.clear()


def _model(fast: bool, args=ARGS):
    torch.manual_seed(0)
    model = build_model(args)
    use_fast_scan(model, fast)
    return model


def _loss(model, seed: int, labels: bool = True):
    """The LM loss, or (labels False: megatron's cross entropy cannot back-propagate twice) a fixed
    random projection of the logits."""
    tokens = _tokens(2, SEQ, seed=seed)
    if labels:
        return model(tokens, labels=tokens).loss
    logits = model(tokens).logits
    return (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))).sum()


def _grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _worst(got: dict, want: dict) -> float:
    return max(rel_diff(got[name], g) for name, g in want.items())


def _micro_batches_in_flight(model, seeds=(1, 2, 3)) -> dict:
    """Every micro-batch's forward before any backward (as 1F1B's first stage runs them), then the
    backwards in reverse order: each layer has len(seeds) calls in flight."""
    losses = [_loss(model, seed) for seed in seeds]
    for loss in reversed(losses):
        loss.backward()
    return _grads(model)


def _slots() -> list[int]:
    return [len(scan.slots.slots) for scan in scan_graphs._CACHE.values()]


def _block_slots() -> list[int]:
    return [len(scan.blocks.slots) for scan in scan_graphs._CACHE.values()]


@pytest.mark.parametrize("max_slots", [128, 4, 0], ids=["a slot per call", "slots run out", "no slots"])
def test_micro_batches_in_flight_each_read_their_own_slot(max_slots, monkeypatch):
    """Three micro-batches of two layers in flight: six slots, or four and two calls through the
    shared buffers, or none; the same gradients as the eager scan either way."""
    monkeypatch.setattr(scan_slots, "MAX_SLOTS", max_slots)
    want = _micro_batches_in_flight(_model(fast=False))
    got = _micro_batches_in_flight(_model(fast=True))
    assert _slots() == _block_slots() == [min(6, max_slots)]
    assert len(want) >= 10 and _worst(got, want) <= RTOL, _worst(got, want)


def test_a_slot_handed_out_while_still_read_goes_red(monkeypatch):
    """The broken variant: every slot counted free, so the second micro-batch's forward writes over
    the first's activations before the first's backward reads them."""
    monkeypatch.setattr(scan_slots.Slot, "free", lambda self: True)
    want = _micro_batches_in_flight(_model(fast=False))
    try:
        got = _micro_batches_in_flight(_model(fast=True))
    except RuntimeError as err:  # on CPU autograd sees the write (the GPU's graph replay would not)
        assert "modified by an inplace operation" in str(err)
        return
    assert _worst(got, want) > 1e3 * RTOL


def test_a_keys_values_slot_handed_out_while_still_read_goes_red(monkeypatch):
    """The same for the held keys/values buffers alone: every call takes the first one, so each
    micro-batch's forward loads its block K/V over the one before's before that one's backward."""
    take = fast_scan._take_blocks
    monkeypatch.setattr(fast_scan, "_take_blocks", lambda *args: None if take(*args) is None else 0)
    want = _micro_batches_in_flight(_model(fast=False))
    try:
        got = _micro_batches_in_flight(_model(fast=True))
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err)
        return
    assert _worst(got, want) > 1e3 * RTOL


def test_slots_come_back_after_the_backward_and_when_the_graph_is_dropped():
    """Step after step each layer takes its slot back (no new slots, no new loops); a forward whose
    graph is dropped without a backward gives its slots back too."""
    model = _model(fast=True)
    counts = []
    for seed in (1, 2, 3):
        _loss(model, seed).backward()
        counts.append((_slots(), [len(scan.loops) for scan in scan_graphs._CACHE.values()]))
    assert counts == [([2], [4])] * 3, counts
    loss = _loss(model, 4)
    del loss
    _loss(model, 5).backward()
    assert _slots() == [2]


def test_retain_graph_keeps_the_slots_busy_until_the_last_backward():
    """backward(retain_graph=True), then another micro-batch's forward and backward, then the first
    graph's backward again: it must still read its own activations (the slots stay busy)."""
    models = {fast: _model(fast) for fast in (False, True)}
    grads = {}
    for fast, model in models.items():
        first = _loss(model, 1, labels=False)
        first.backward(retain_graph=True)
        _loss(model, 2, labels=False).backward()
        first.backward()
        grads[fast] = _grads(model)
    assert _slots() == [4]
    assert _worst(grads[True], grads[False]) <= RTOL, _worst(grads[True], grads[False])


class _Copies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _copies_per_step(model) -> int:
    _loss(model, 1).backward()  # the first step makes the buffers
    with _Copies() as copies:
        _loss(model, 2).backward()
    return copies.count


def test_slots_remove_the_kept_activations_round_trip(monkeypatch):
    """With slots, a call's 9 kept tensors are neither cloned out after the forward nor copied back
    before the backward: 18 copies fewer per layer call, exactly; and the backward reads the keys/values
    buffers the forward wrote (model/fast_scan.py `_take_blocks`) instead of loading them again: 2 fewer."""
    counts = {}
    for max_slots, hold in ((0, False), (128, False), (128, True)):
        monkeypatch.setattr(scan_slots, "MAX_SLOTS", max_slots)
        monkeypatch.setattr(fast_scan, "HOLD_BLOCKS", hold)
        scan_graphs.clear()
        counts[max_slots, hold] = _copies_per_step(_model(fast=True))
    assert counts[0, False] - counts[128, False] == 18 * ARGS.num_layers, counts
    assert counts[128, False] - counts[128, True] == 2 * ARGS.num_layers, counts


def test_the_same_calls_take_the_same_slots_and_graphs_every_step():
    """Three micro-batches in flight, three steps: each layer's k-th call takes its k-th slot, so
    the second and third steps make no slot and no loop (a loop is a CUDA graph to capture on GPU)."""
    model = _model(fast=True)
    counts = []
    for _ in range(3):
        _micro_batches_in_flight(model)
        counts.append((_slots(), [len(scan.loops) for scan in scan_graphs._CACHE.values()]))
    assert counts == [([6], [12])] * 3, counts


def test_a_forward_without_gradients_keeps_nothing_and_takes_no_slot():
    """Evaluation between steps: nothing to keep, so the shared buffers (no slot, no clone); the
    same logits as the eager scan, and the training step after it takes its slots back."""
    models = {fast: _model(fast) for fast in (False, True)}
    _loss(models[True], 1).backward()
    tokens = _tokens(2, SEQ, seed=5)
    with torch.no_grad():
        logits = {fast: model(tokens).logits for fast, model in models.items()}
    assert _slots() == [2]
    _loss(models[True], 2).backward()
    assert _slots() == [2] and rel_diff(logits[True], logits[False]) <= RTOL


@pytest.mark.parametrize("owner, expected", [("layer", scan_slots.MAX_SLOTS_PER_OWNER), (None, 12)])
def test_a_layer_has_up_to_its_own_limit_and_shared_loops_up_to_the_shapes(owner, expected, monkeypatch):
    """A layer reading its weights in place has at most MAX_SLOTS_PER_OWNER slots; where the weights
    are copied in, one owner (None) stands for every layer and has up to MAX_SLOTS."""
    monkeypatch.setattr(scan_slots, "MAX_SLOTS", 12)
    slots, held, taken = scan_slots.Slots(), [], []
    for _ in range(20):
        taken.append(slots.take(owner, lambda: (torch.zeros(2),)))
        if taken[-1] is not None:
            held.append(slots[taken[-1]].lend())  # in flight: its aliases alive
    assert taken[:expected] == list(range(expected)) and taken[expected:] == [None] * (20 - expected)
    del held
    assert slots.take(owner, lambda: (torch.zeros(2),)) == 0  # all free again: the first comes back


@pytest.mark.parametrize("recompute_fam_scan, slots", [(True, 1), (False, 2)], ids=["scan re-run", "scan stashed"])
def test_layers_recomputed_one_after_another_share_one_slot(recompute_fam_scan, slots):
    """Layer recompute that re-runs the scan just before each layer's backward has one layer's call
    in flight at a time: the layers share one slot (a slot each would hold every layer's activations
    between steps), and one keys/values slot. Where the forward's scan is stashed for the backward,
    both are in flight: two, and no keys/values slot (each would hold its layer's block K/V).
    The same slots and loops every step, and the eager scan's gradients."""
    args = small_args(num_layers=2, init_method_std=0.1, recompute=True, recompute_fam_scan=recompute_fam_scan)
    models = {fast: _model(fast, args) for fast in (False, True)}
    counts = []
    for seed in (1, 2, 3):
        _loss(models[True], seed).backward()
        counts.append((_slots(), [len(scan.loops) for scan in scan_graphs._CACHE.values()]))
    assert counts == [([slots], [4])] * 3, counts
    assert _block_slots() == [1 if recompute_fam_scan else 0]  # a replayed scan holds no keys/values
    for model in models.values():
        model.zero_grad(set_to_none=True)
        _loss(model, 4).backward()
    got, want = _grads(models[True]), _grads(models[False])
    assert _worst(got, want) <= RTOL, _worst(got, want)


def _grads_and_state_at(model, seq: int, seed: int) -> dict:
    """Every gradient, and each layer's last FAM (the state for the next call, which the last block's
    keys alone decide: the loss does not read it)."""
    model.zero_grad(set_to_none=True)
    tokens = _tokens(2, seq, seed=seed)
    out = model(tokens, labels=tokens)
    out.loss.backward()
    return {**_grads(model), **{f"fam {i}": s.fam.detach() for i, s in enumerate(out.state.layers)}}


def test_constant_inputs_are_loaded_once_per_length_not_per_call(monkeypatch):
    """The static buffers get the residual scales and the key bias (model/fast_scan.py `_constants`) when
    first made and when the length changes, not at every call: two steps of a 2-layer model build them
    once. Lengths 37 and 38 have the same 5 blocks, the last partial, so they share one set of buffers
    with different key biases: each must get its own (every gradient and the last FAM of each layer against
    the eager scan), also when the first comes back. Red if the buffers kept the first length's bias."""
    import model.scan_buffers as scan_buffers

    built = []
    real = scan_buffers.key_bias
    monkeypatch.setattr(scan_buffers, "key_bias", lambda *a: built.append(a) or real(*a))
    fast = _model(fast=True)
    for seed in (1, 2):
        _loss(fast, seed).backward()
    assert len(built) == 1, built
    eager = _model(fast=False)
    for seq, seed in ((38, 3), (37, 4), (38, 5)):
        got, want = _grads_and_state_at(fast, seq, seed), _grads_and_state_at(eager, seq, seed)
        assert _worst(got, want) <= RTOL, (seq, _worst(got, want))
    assert [a[3] for a in built] == [37, 38, 37, 38]  # S: a new bias at each change of length
