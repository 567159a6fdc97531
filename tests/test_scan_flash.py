"""The fast scan's flash-attention path (model/scan_step.py `uses_flash`) on CPU, where flash does
not run: a reference "flash" in plain matrix products, with the same contract as the kernels the
GPU calls (the forward returns its output and log-sum-exp; the backward gets them back, the output
as the step's kept `x_proj` read in the heads' layout), is put in their place. So the path's
plumbing (which steps take it, the kept log-sum-exp, the output read back from `x_proj`, the
gradients it hands on) is checked against the eager scan here, with grouped and multi-query heads
and under tensor and sequence parallelism, which the GPU tests do not cover. The kernels
themselves are checked on GPU (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

import model.scan_step as scan_step
from tests.spawn import run_on_ranks
from tests.test_reference import small_args
from tests.test_scan import CASES, RTOL, _differences, _tp_worker


def reference_flash(q, kh, vh, head_dim: int):
    """(softmax(q k^T / sqrt(d)) v in q's dtype, its log-sum-exp fp32): the forward kernel's contract."""
    s = q.float() @ kh.float().transpose(-1, -2) * head_dim**-0.5
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse[..., None]) @ vh.float()).to(q.dtype), lse


def reference_flash_backward(d_ctx, q, kh, vh, ctx, lse, head_dim: int):
    """(dq, d_keys, d_values) fp32 from the forward's output ctx and lse, as flash's backward."""
    scale = head_dim**-0.5
    q, kh, vh, ctx, d_ctx = q.float(), kh.float(), vh.float(), ctx.float(), d_ctx.float()
    p = torch.exp(q @ kh.transpose(-1, -2) * scale - lse[..., None])
    ds = p * (d_ctx @ vh.transpose(-1, -2) - (d_ctx * ctx).sum(-1, keepdim=True))
    return ds @ kh * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ d_ctx


def _uses_flash_anywhere(q, keys, key_bias, dtype):
    return scan_step.FLASH and key_bias is None


BREAKS = {
    "log-sum-exp not kept": lambda d_ctx, q, kh, vh, ctx, lse, head_dim: reference_flash_backward(
        d_ctx, q, kh, vh, ctx, lse * 0, head_dim),
    "output not read back": lambda d_ctx, q, kh, vh, ctx, lse, head_dim: reference_flash_backward(
        d_ctx, q, kh, vh, ctx * 0, lse, head_dim),
}


def use_reference_flash(patch, broken: str | None = None) -> list:
    """Puts the reference kernels in place (patch: monkeypatch.setattr or setattr); returns a list
    that counts the steps that ran them."""
    calls = []

    def flash(*args):
        calls.append(1)
        return reference_flash(*args)

    patch(scan_step, "uses_flash", _uses_flash_anywhere)
    patch(scan_step, "_flash", flash)
    patch(scan_step, "_flash_backward", BREAKS[broken] if broken else reference_flash_backward)
    return calls


@pytest.mark.parametrize("case", ["whole blocks", "partial last block", "multi-query"])
def test_the_flash_path_matches_the_eager_scan(case, monkeypatch):
    calls = use_reference_flash(monkeypatch.setattr)
    over, seq = CASES[case]
    diffs = _differences(small_args(num_layers=3, **over), seq)
    assert calls and len(diffs) > 20
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert not bad, bad


def test_the_flash_path_takes_a_passed_in_state(monkeypatch):
    calls = use_reference_flash(monkeypatch.setattr)
    diffs = _differences(small_args(num_layers=2), 37, with_state=True)
    assert calls
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert not bad, bad


@pytest.mark.parametrize("broken", BREAKS)
def test_a_flash_backward_without_its_kept_tensors_goes_red(broken, monkeypatch):
    use_reference_flash(monkeypatch.setattr, broken)
    diffs = _differences(small_args(num_layers=2), 37)
    assert max(diffs.values()) > 50 * RTOL, diffs


def _flash_tp_worker(rank, world_size, sequence_parallel):
    calls = use_reference_flash(setattr)
    diffs = _tp_worker(rank, world_size, sequence_parallel)
    assert calls
    return diffs


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_the_flash_path_matches_the_eager_scan_under_tensor_parallelism(sequence_parallel):
    for rank, diffs in enumerate(run_on_ranks(_flash_tp_worker, 2, sequence_parallel)):
        assert len(diffs) > 15
        bad = {name: d for name, d in diffs.items() if not d <= RTOL}
        assert not bad, (rank, bad)


@pytest.mark.parametrize("groups", [4, 2], ids=["one head per group", "grouped"])
def test_the_flash_backward_gets_its_output_and_output_gradient_in_its_own_layout(groups, monkeypatch):
    """ATen's flash backward copies an output or output gradient that is not [b, rows, g, d]
    contiguous (seen as [b, g, rows, d]): the step hands both over in that layout, at micro-batch 2,
    one head per group (fam-1b's case, where a reshape of a permuted view keeps the old layout) and
    grouped."""
    use_reference_flash(monkeypatch.setattr)
    layouts = []

    def backward(d_ctx, q, kh, vh, ctx, *rest):
        layouts.append((d_ctx.shape[0], d_ctx.transpose(1, 2).is_contiguous(), ctx.transpose(1, 2).is_contiguous()))
        return reference_flash_backward(d_ctx, q, kh, vh, ctx, *rest)

    monkeypatch.setattr(scan_step, "_flash_backward", backward)
    diffs = _differences(small_args(num_layers=2, num_query_groups=groups), 40)
    assert layouts and all(batch == 2 for batch, *_ in layouts)
    assert all(d_ctx for _, d_ctx, _ in layouts), "output gradient not in flash's layout"
    assert all(ctx for *_, ctx in layouts), "output not in flash's layout"
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert not bad, bad


def _fake_cudnn(calls: list):
    """Stand-ins for ATen's cuDNN attention ops with their contract (the output in q's layout, the
    log-sum-exp [b, g, rows, 1], the backward's arguments by position), from the reference kernels."""

    def forward(q, kh, vh, attn_bias, compute_log_sumexp, *_, scale=None):
        assert attn_bias is None and compute_log_sumexp and scale == q.shape[-1] ** -0.5
        out, lse = reference_flash(q, kh, vh, q.shape[-1])
        calls.append(("forward", q.transpose(1, 2).is_contiguous()))
        out = torch.empty_like(q).copy_(out)  # q's strides, as cuDNN allocates its output
        return out, lse.unsqueeze(-1), None, None, q.shape[2], kh.shape[2], None, None, None

    def backward(d_ctx, q, kh, vh, ctx, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout, causal,
                 scale=None):
        assert lse.shape[-1] == 1 and (bias, cum_q, cum_k, dropout, causal) == (None, None, None, 0.0, False)
        assert (max_q, max_k, scale) == (q.shape[2], kh.shape[2], q.shape[-1] ** -0.5)
        calls.append(("backward", d_ctx.stride() == ctx.stride()))
        return tuple(x.to(q.dtype) for x in reference_flash_backward(d_ctx, q, kh, vh, ctx, lse[..., 0],
                                                                     q.shape[-1]))
    return forward, backward


@pytest.mark.parametrize("case", ["whole blocks", "multi-query"])
def test_the_cudnn_kernel_path_matches_the_eager_scan(case, monkeypatch):
    """FUSED_KERNEL = "cudnn": the step calls cuDNN's ops (stand-ins here) with q laid out as flash's
    output (so the kept output is in flash's layout too), its log-sum-exp reshaped both ways, the output
    gradient in the output's strides; the scan matches the eager one."""
    calls = []
    forward, backward = _fake_cudnn(calls)
    monkeypatch.setattr(scan_step, "uses_flash", _uses_flash_anywhere)
    monkeypatch.setattr(scan_step, "FUSED_KERNEL", "cudnn")
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", forward)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward", backward)
    over, seq = CASES[case]
    diffs = _differences(small_args(num_layers=3, **over), seq)
    assert {kind for kind, _ in calls} == {"forward", "backward"} and all(ok for _, ok in calls), calls
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert len(diffs) > 20 and not bad, bad
