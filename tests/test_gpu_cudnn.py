"""GPU: the scan steps' attention by cuDNN's fused kernel (model/scan_step.py FUSED_KERNEL = "cudnn"; marked
`gpu`). A bf16 layer's fast scan (compiled, captured) over 700 tokens (5 whole blocks: the fused kernel; a
partial last one: the matrix products), from the prompt and from a passed-in FAM: outputs and the gradients of
FAM0, K, V and every weight against the fp32 layer, as close as the flash steps are; none of flash's kernels
run; a backward handed a wrong log-sum-exp goes red. tests/test_scan_flash.py checks the path's plumbing
(layouts, the log-sum-exp's shape, the arguments) on CPU with stand-in kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import model.scan_graphs as scan_graphs
import model.scan_step as scan_step
from tests.test_gpu import (ARGS, FLASH_FACTOR, _worst_error, bf16_layer_and_fp32_twin, kernels_launched,  # noqa: F401
                            lse_zeroed, no_tf32, scans)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]

# Head size 64 (cuDNN's kernels take multiples of 8; fam-1b's is 128), two heads a group.
CUDNN_ARGS = dataclasses.replace(ARGS, hidden_size=256)


def _run_with_kernels(run) -> tuple[list, set]:
    """run()'s result and the names of the CUDA kernels it launched, the steps compiled afresh."""
    found, names = kernels_launched(run)
    return found, set(names)


def test_cudnn_scan_steps_are_as_close_to_fp32_as_the_flash_steps(monkeypatch):
    layer, reference = bf16_layer_and_fp32_twin(CUDNN_ARGS)
    want, _ = _run_with_kernels(scans(reference, torch.float32))
    runs = {}
    for name, flash, kernel in (("matmul", False, "flash"), ("flash", True, "flash"), ("cudnn", True, "cudnn")):
        monkeypatch.setattr(scan_step, "FLASH", flash)
        monkeypatch.setattr(scan_step, "FUSED_KERNEL", kernel)
        runs[name] = _run_with_kernels(scans(layer, torch.bfloat16))
    errors = {name: _worst_error(found, want) for name, (found, _) in runs.items()}
    flash_kernels = {n for n in runs["flash"][1] - runs["matmul"][1] if "flash" in n.lower()}
    cudnn_kernels = runs["cudnn"][1] - runs["flash"][1] - runs["matmul"][1]
    print(f"\nbf16 scan vs fp32, worst output or gradient: {errors}\nflash's kernels: {sorted(flash_kernels)}"
          f"\nkernels only under cuDNN: {sorted(cudnn_kernels)}")
    assert flash_kernels and not flash_kernels & runs["cudnn"][1] and cudnn_kernels
    assert len(want[0]) >= 12 and errors["cudnn"] <= FLASH_FACTOR * errors["matmul"], errors
    monkeypatch.setattr(scan_step, "_cudnn_backward", lse_zeroed(scan_step._cudnn_backward))
    broken, _ = _run_with_kernels(scans(layer, torch.bfloat16))
    assert _worst_error(broken, want) > 10 * FLASH_FACTOR * errors["matmul"], _worst_error(broken, want)
    scan_graphs.clear()
