"""GPU: block 0's step and the prompt step as one (model/scan_first_step.py, fast_scan.MERGED_FIRST_STEP;
marked `gpu`). The merged step compiled and captured against the separate steps, fp32, from the prompt, over
700 tokens (5 whole blocks, a partial one): outputs and the gradients of FAM0, K, V and every weight, on the
call that captures and on a replay; and in bf16 against the fp32 layer, as close as the separate steps are.
tests/test_scan_first_step.py checks the same step on CPU against the eager scan, with broken variants."""

from __future__ import annotations

import pytest
import torch

import model.fast_scan as fast_scan_module
import model.scan_graphs as scan_graphs
from model import build_model
from tests.test_gpu import (ARGS, CAPTURE_TOLERANCE, FLASH_FACTOR, SEQ, _errors, _report, _scan_outputs_and_grads,
                            _worst_error, no_tf32)  # noqa: F401 - a fixture

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]


def _merged(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(fast_scan_module, "MERGED_FIRST_STEP", on)
    scan_graphs.clear()


def test_the_merged_first_step_equals_the_separate_steps_captured_and_replayed(monkeypatch):
    layer = build_model(ARGS, device="cuda").layers[1]
    _merged(monkeypatch, False)
    want = _scan_outputs_and_grads(layer, True, SEQ, 3)
    _merged(monkeypatch, True)
    for call in ("captures", "replays"):
        errors = _errors(_scan_outputs_and_grads(layer, True, SEQ, 3), want)
        _report(f"merged first step vs separate, fp32, the call that {call}", {"logits": errors["output 0"], **errors})
        bad = {n: e for n, e in errors.items() if not e <= CAPTURE_TOLERANCE}
        assert len(errors) >= 12 and not bad, (call, bad)
    scan_graphs.clear()


def test_the_merged_first_step_in_bf16_is_as_close_to_fp32_as_the_separate_steps(monkeypatch):
    model, fp32 = build_model(ARGS, device="cuda").to(torch.bfloat16), build_model(ARGS, device="cuda")
    fp32.load_state_dict(model.state_dict())
    layer, reference = model.layers[1], fp32.layers[1]
    want = [_scan_outputs_and_grads(reference, True, SEQ, 3, torch.float32, bf16_inputs=True)]
    errors = {}
    for name, on in (("separate", False), ("merged", True)):
        _merged(monkeypatch, on)
        errors[name] = _worst_error([_scan_outputs_and_grads(layer, True, SEQ, 3, torch.bfloat16, bf16_inputs=True)],
                                    want)
    print(f"\nbf16 scan vs fp32, worst output or gradient: {errors}")
    assert errors["merged"] <= FLASH_FACTOR * errors["separate"], errors
    scan_graphs.clear()
