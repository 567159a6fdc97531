"""GPU: the captured scan's kept-activation slots (model/scan_slots.py; marked `gpu`).

Three calls of one layer in flight (as 1F1B's first stage keeps them), then their backwards in
reverse: each captured loop must read its own slot, against the same compiled steps uncaptured
over fresh buffers. And step after step each call takes its slot back: nothing the compiled
steps or the capture keep must hold a slot busy (that would take a new slot per call, up to
MAX_SLOTS, and hold their memory). A slot handed out while still read goes red (on the GPU a
replay writes over it silently: only the numbers show it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import model.scan_graphs as scan_graphs
import model.scan_slots as scan_slots
from model import build_model
from tests.test_gpu import ARGS, CAPTURE_TOLERANCE, SEQ, _errors, _report, no_tf32, scan_call  # noqa: F401 - a fixture

pytestmark = pytest.mark.gpu


def _in_flight(layer, seeds=(1, 2, 3)) -> dict:
    calls = [scan_call(layer, False, SEQ, seed)[1:] for seed in seeds]  # from a passed-in FAM
    found = {}
    for seed, (loss, inputs) in reversed(list(zip(seeds, calls))):
        for name, grad in zip(inputs, torch.autograd.grad(loss, list(inputs.values()))):
            found[f"call {seed} grad {name}"] = grad
    found["logits"] = found["call 1 grad fam0"]  # _report's first entry
    return found


def _slots() -> list[int]:
    return [len(scan.slots.slots) for scan in scan_graphs._CACHE.values()]


def _block_slots() -> list[int]:  # the keys/values buffers held for the backward (model/fast_scan.py `_take_blocks`)
    return [len(scan.blocks.slots) for scan in scan_graphs._CACHE.values()]


@pytest.mark.parametrize("broken", [False, True], ids=["slots", "a slot handed out while read"])
def test_captured_calls_in_flight_each_read_their_own_slot(broken, monkeypatch, no_tf32):
    layer = build_model(ARGS, device="cuda").layers[0]
    monkeypatch.setattr(scan_graphs, "MODE", "off")
    want = _in_flight(layer)
    monkeypatch.setattr(scan_graphs, "MODE", "cuda")
    scan_graphs.clear()
    for round_ in range(2):  # the first round runs directly and captures a loop pair per slot, the second replays
        if broken and round_ == 1:  # replays write over slot 0 without autograd seeing it (no version bump)
            monkeypatch.setattr(scan_slots.Slot, "free", lambda self: True)
        try:
            errors = _errors(_in_flight(layer), want)
        except RuntimeError as err:  # the block K/V load into a held keys/values buffer is outside the graph:
            assert broken and "modified by an inplace operation" in str(err), err  # autograd sees that write
            scan_graphs.clear()
            return
    _report(f"captured calls in flight{', broken' if broken else ''}", errors)
    slots = _slots(), _block_slots()
    scan_graphs.clear()
    if broken:
        assert max(errors.values()) > 1e4 * CAPTURE_TOLERANCE, errors
        return
    assert slots == ([3], [3]), slots
    bad = {n: e for n, e in errors.items() if not e <= CAPTURE_TOLERANCE}
    assert len(errors) >= 27 and not bad, bad


@pytest.mark.parametrize("recompute_fam_scan", [False, True], ids=["no recompute", "scan re-run"])
def test_each_step_takes_its_slots_back(recompute_fam_scan, no_tf32, monkeypatch):
    """A two-layer model, five captured steps (forward and backward): one slot per layer, and one
    keys/values slot; with the scan re-run just before each layer's backward, one of each for both
    layers (model/scan_slots.py)."""
    monkeypatch.setattr(scan_graphs, "MODE", "cuda")
    scan_graphs.clear()
    args = dataclasses.replace(ARGS, recompute=True, recompute_fam_scan=True) if recompute_fam_scan else ARGS
    model = build_model(args, device="cuda")
    tokens = torch.randint(0, ARGS.vocab_size, (2, SEQ), device="cuda", generator=torch.Generator(
        device="cuda").manual_seed(0))
    for _ in range(5):
        model(tokens, labels=tokens).loss.backward()
    slots, loops = (_slots(), _block_slots()), [len(scan.loops) for scan in scan_graphs._CACHE.values()]
    scan_graphs.clear()
    want = [1 if recompute_fam_scan else ARGS.num_layers]
    assert slots == (want, want) and loops == [2 * ARGS.num_layers], (slots, loops)
