"""model/step_attention_kernel.py (issue 13): the fast-scan step's attention backward as one Triton
kernel. Here on CPU: its plain-PyTorch contract (`attention_backward_reference`) against autograd; the
Triton kernel itself in Triton's interpreter against that contract (fp32, and fp16 operands; the
interpreter's bf16 products are not usable); and the scan's loop running its steps through the
contract (model/fast_scan.py ATTENTION_BACKWARD = "reference") against the eager scan, every gradient.
tests/test_gpu_kernel.py runs the compiled kernel on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.fast_scan as fast_scan_module
from model import step_attention_kernel as kernel
from tests.test_reference import small_args
from tests.test_scan import RTOL, _differences
from tests.time_bounds import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parent.parent


def problem(b=2, g=3, npg=2, n_f=16, c=40, d=16, dtype=torch.float64, seed=0):
    """Inputs of one step's attention backward: q [b, g, npg*F, d], keys/values [F + c, b, g, d], the output
    gradient, the forward's log-sum-exp and delta = rowsum(d_ctx * out)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, g, npg * n_f, d, generator=gen).to(dtype)
    keys, values = (torch.randn(n_f + c, b, g, d, generator=gen).to(dtype) for _ in range(2))
    s = q.double() @ keys.permute(1, 2, 0, 3).double().transpose(-1, -2) * d**-0.5
    out = torch.softmax(s, -1) @ values.permute(1, 2, 0, 3).double()
    d_ctx = torch.randn(out.shape, generator=gen).to(dtype)
    return dict(d_ctx=d_ctx, q=q, keys=keys, values=values, lse=torch.logsumexp(s, -1).float(),
                delta=(d_ctx.double() * out).sum(-1).float(), n_f=n_f, scale=d**-0.5)


def test_the_reference_is_autograds_backward_of_the_attention():
    """fp64, 2 heads a group, a block of 40 keys: dQ, the FAM rows' dK, dV and the block rows' written out."""
    x = problem()
    c, (b, g, _, d) = x["keys"].shape[0] - x["n_f"], x["q"].shape
    out_dk, out_dv = (torch.empty(c, b, g, d, dtype=torch.float64) for _ in range(2))
    dq, d_fam_k, d_fam_v = kernel.attention_backward_reference(**x, out_dk=out_dk, out_dv=out_dv)
    q, kh, vh = (t.clone().requires_grad_() for t in (x["q"], x["keys"].permute(1, 2, 0, 3),
                                                      x["values"].permute(1, 2, 0, 3)))
    o = torch.softmax(q @ kh.transpose(-1, -2) * x["scale"], -1) @ vh
    want = torch.autograd.grad(o, (q, kh, vh), x["d_ctx"])
    n_f = x["n_f"]
    torch.testing.assert_close(dq, want[0].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_fam_k, want[1][:, :, :n_f].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_fam_v, want[2][:, :, :n_f].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_dk, want[1][:, :, n_f:].permute(2, 0, 1, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_dv, want[2][:, :, n_f:].permute(2, 0, 1, 3), rtol=1e-5, atol=1e-6)


INTERPRETED = r'''
import sys, torch
from model import step_attention_kernel as kernel
from tests.test_step_attention_kernel import problem
dtype = {"fp32": torch.float32, "fp16": torch.float16}[sys.argv[1]]
worst = {}
for npg, c in ((1, 48), (2, 40), (1, 0)):  # one head a group; two, with a key tile past the keys; the prompt step
    x = problem(npg=npg, c=c, dtype=dtype)
    b, g, _, d = x["q"].shape
    outs = [[torch.full((c, b, g, d), 7.0, dtype=dtype) for _ in range(2)] if c else [None, None] for _ in range(2)]
    want = kernel.attention_backward_reference(**x, out_dk=outs[0][0], out_dv=outs[0][1])
    got = kernel.attention_backward(**x, out_dk=outs[1][0], out_dv=outs[1][1])
    pairs = list(zip(got, want)) + ([(outs[1][0], outs[0][0]), (outs[1][1], outs[0][1])] if c else [])
    for i, (a, b_) in enumerate(pairs):
        worst[(npg, c, i)] = ((a.float() - b_.float()).abs().max() / b_.float().abs().max()).item()
print(max(worst.values()), worst)
'''


@pytest.mark.parametrize("dtype, bound", [("fp32", 1e-5), ("fp16", 2e-2)])
def test_the_triton_kernel_in_the_interpreter_gives_the_references_gradients(dtype, bound):
    """Every output of the kernel (dQ by atomic adds, the FAM rows' dK, dV, the block rows' written in place
    over a buffer of 7s) equals the reference's: fp32 to rounding; fp16 operands, where the two round p
    and ds at different places, within fp16's rounding. A wrong index or mask leaves 7s or moves a row."""
    pytest.importorskip("triton", reason="Triton is in requirements.txt; CUDA builds of torch bring it")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", INTERPRETED, dtype], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = float(done.stdout.split()[0])
    assert worst <= bound, done.stdout


CASES = {
    "whole blocks": ({}, 40),
    "partial last block": ({}, 37),  # its step keeps the masked products; the others take the kernel's path
    "multi-query": ({"num_query_groups": 1}, 37),
    "FAM as long as a block": ({"fam_len": 8}, 37),
    "activation recompute": ({"recompute": True}, 37),
}


@pytest.mark.parametrize("case", CASES)
def test_the_scan_through_the_kernels_contract_matches_the_eager_scan(case, monkeypatch):
    monkeypatch.setattr(fast_scan_module, "ATTENTION_BACKWARD", "reference")
    calls = []
    reference = kernel.attention_backward_reference
    monkeypatch.setattr(kernel, "attention_backward_reference", lambda *a, **k: calls.append(1) or reference(*a, **k))
    over, seq = CASES[case]
    diffs = _differences(small_args(num_layers=3, **over), seq)
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert calls and len(diffs) > 20 and not bad, bad


def test_a_kernel_without_delta_goes_red(monkeypatch):
    """ds = p (dp - delta): a delta of zero (the term the kernel takes as input) must move the gradients."""
    monkeypatch.setattr(fast_scan_module, "ATTENTION_BACKWARD", "reference")
    reference = kernel.attention_backward_reference
    monkeypatch.setattr(kernel, "attention_backward_reference",
                        lambda d_ctx, q, keys, values, lse, delta, *a, **k: reference(d_ctx, q, keys, values, lse,
                                                                                      delta * 0, *a, **k))
    diffs = _differences(small_args(num_layers=2), 37)
    assert max(diffs.values()) > 50 * RTOL, diffs
