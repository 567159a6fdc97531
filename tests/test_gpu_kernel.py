"""GPU: the scan steps' attention backward in one Triton kernel (model/step_attention_kernel.py; marked
`gpu`). The compiled kernel against its plain-PyTorch contract at fam-1b's step shape, and a bf16 layer's
captured fast scan with `ATTENTION_BACKWARD = "kernel"` against the same layer in fp32, as close as with
flash's backward; a kernel handed no delta goes red. tests/test_step_attention_kernel.py checks the same
kernel in Triton's interpreter on CPU."""

from __future__ import annotations

import pytest
import torch

import model.fast_scan as fast_scan_module
import model.scan_graphs as scan_graphs
from model import build_model, step_attention_kernel
from tests.test_gpu import ARGS, FLASH_FACTOR, SEQ, _scan_outputs_and_grads, _worst_error, no_tf32  # noqa: F401
from tests.test_step_attention_kernel import problem

pytestmark = pytest.mark.gpu


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_compiled_kernel_gives_the_references_gradients_at_fam_1bs_step_shape():
    """fam-1b's step (12 groups of one head, F = 64 queries, 1,088 keys of 128, micro-batch 4) in bf16: dQ,
    the FAM rows' dK, dV and the block rows written over a buffer of 7s, against the reference's."""
    x = problem(b=4, g=12, npg=1, n_f=64, c=1024, d=128, dtype=torch.bfloat16)
    x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    out = [[torch.full((1024, 4, 12, 128), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
           for _ in range(2)]
    want = step_attention_kernel.attention_backward_reference(**x, out_dk=out[0][0], out_dv=out[0][1])
    got = step_attention_kernel.attention_backward(**x, out_dk=out[1][0], out_dv=out[1][1])
    errors = [_rel(a, b) for a, b in zip((*got, *out[1]), (*want, *out[0]))]
    print(f"\nkernel vs reference, bf16: {['%.1e' % e for e in errors]}")
    assert max(errors) < 1e-2, errors


def _scans(layer, dtype):
    return lambda: [_scan_outputs_and_grads(layer, p, SEQ, 3, dtype, bf16_inputs=True) for p in (True, False)]


def _kernel_launches(run) -> tuple[list, int]:
    scan_graphs.clear()
    torch._dynamo.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        found = run()
        torch.cuda.synchronize()
    return found, sum("_backward_kernel" in e.name for e in prof.events())


def test_the_kernels_scan_is_as_close_to_fp32_as_flashs(monkeypatch, no_tf32):
    """A bf16 layer's captured fast scan over 700 tokens (5 whole blocks through the kernel, a partial one
    through the masked products), from the prompt and from a passed-in FAM: outputs and the gradients of
    FAM0, K, V and every weight, with flash's backward and the kernel's, against the fp32 layer."""
    model, fp32 = build_model(ARGS, device="cuda").to(torch.bfloat16), build_model(ARGS, device="cuda")
    fp32.load_state_dict(model.state_dict())
    layer, reference = model.layers[1], fp32.layers[1]
    want, _ = _kernel_launches(_scans(reference, torch.float32))
    runs = {}
    for name in ("flash", "kernel"):
        monkeypatch.setattr(fast_scan_module, "ATTENTION_BACKWARD", name)
        runs[name] = _kernel_launches(_scans(layer, torch.bfloat16))
    errors = {name: _worst_error(found, want) for name, (found, _) in runs.items()}
    print(f"\nbf16 scan vs fp32, worst output or gradient: {errors}; kernel launches "
          f"{ {name: n for name, (_, n) in runs.items()} }")
    assert runs["flash"][1] == 0 and runs["kernel"][1] > 0
    assert len(want[0]) >= 12 and errors["kernel"] <= FLASH_FACTOR * errors["flash"], errors
    backward = step_attention_kernel.attention_backward
    monkeypatch.setattr(step_attention_kernel, "attention_backward",
                        lambda d_ctx, q, keys, values, lse, delta, *a: backward(d_ctx, q, keys, values, lse, delta * 0,
                                                                                *a))
    broken, _ = _kernel_launches(_scans(layer, torch.bfloat16))
    assert _worst_error(broken, want) > 10 * FLASH_FACTOR * errors["flash"], _worst_error(broken, want)
    scan_graphs.clear()
