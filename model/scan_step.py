"""One FAM scan step and its hand-written backward, as plain functions of tensors (the fast scan).

The math is model/scan.py's `fam_step` (the eager oracle), written out so that
  - the forward runs without building an autograd graph and writes what the backward needs
    (`Activations`: F rows per block, small) into the scan's buffers, and
  - the backward reads those instead of recomputing the step (no second pass over the four
    GEMMs, whose F-row products are bound by reading the weights), and returns activation
    gradients only (to the previous FAM, to the block's K/V, and through the FAM K/V the block
    queries read), writing each weight use's output gradient (`Gradients`) beside the forward's
    inputs: model/fast_scan.py turns them into one weight-gradient GEMM per weight.
Both are single graphs for torch.compile (no autograd inside), and the same code runs eagerly
on CPU, where tests/test_scan.py checks it against autograd through `fam_step`.

Keys and values come as one buffer per block, [F + c, b, g, d]: the step writes F_{t-1}'s
keys/values (post-RoPE) into rows :F, rows F: hold block t's (c = C; c = 0 for the soft-prompt
step, whose rows attend only among themselves). So the attention reads one tensor, with no
per-step `cat`. `key_bias` [F + c] (0, or -inf past the sequence end) masks the padding of a
partial last block, so every block, partial or not, runs the same compiled step.

Precision (what autocast does to `fam_step`, minus its per-op casts): the FAM stream, norms,
RoPE, the softmax and the gate are fp32; the four GEMMs take `dtype` (bf16 under autocast);
the attention's matrix products take the keys' dtype (bf16 under autocast, as autocast's SDPA
does) with fp32 results (`_bmm32`), and a bf16 `p` as flash attention's (which runs instead where it
applies: `uses_flash`; its gradients come out in bf16 before the fp32 RoPE backward). Shapes: fam [F, b, h]
(this rank's [F/tp, b, h] under SP), RoPE tables [F, b, 1, d]; n heads in g groups of npg,
head size d.

Tensor parallelism: `enter` / `leave` are megatron's copy-to / reduce-from region (or, under SP,
gather-from / reduce-scatter-to sequence-parallel region), used as plain collectives here. Each
one's adjoint is the other's forward (identity <-> all-reduce, all-gather <-> reduce-scatter), so
the backward uses `leave` where the forward used `enter` and vice versa.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F_


class Activations(NamedTuple):
    """What a step's backward reads, per step: [F, b, ...] (fam, a: this rank's rows under SP), x_proj
    [b, F, ...]."""

    fam: torch.Tensor  # the step's input FAM, fam dtype
    q: torch.Tensor  # the FAM queries after RoPE [b, g, npg*F, d], keys' dtype
    a: torch.Tensor  # the residual after attention, fp32
    gate_up: torch.Tensor  # FC1's output, GEMM dtype
    x_qkv: torch.Tensor  # the four GEMMs' inputs (GEMM dtype): the weight gradients' X
    x_proj: torch.Tensor  # [b, F, n*d]: batch-major, flash's output layout (model/scan_step.py `_as_flash_output`)
    x_fc1: torch.Tensor
    x_fc2: torch.Tensor
    lse: torch.Tensor  # the attention's log-sum-exp [b, g, npg*F] fp32, written where flash attention ran


class Gradients(NamedTuple):
    """What a step's backward writes besides the activation gradients, per step."""

    d_qkv: torch.Tensor  # the four GEMMs' output gradients (GEMM dtype): the weight gradients' dY
    d_proj: torch.Tensor  # [b, F, h]: batch-major, as x_proj
    d_fc1: torch.Tensor
    d_fc2: torch.Tensor
    d_norm1: torch.Tensor  # [h] fp32
    d_norm2: torch.Tensor


def _same(x):
    return x


def _normalize(x, eps: float):
    """RMSNorm without its weight: (x * r, r), r = 1 / rms(x), over the last dim (fp32)."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * r, r


def _normalize_backward(d_xh, xh, r):
    """Gradient w.r.t. x of xh = x * r(x), given d_xh."""
    return r * (d_xh - xh * (d_xh * xh).mean(-1, keepdim=True))


def _rotate(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate_adjoint(u):
    half = u.shape[-1] // 2
    return torch.cat([u[..., half:], -u[..., :half]], dim=-1)


def _rope(x, cos, sin):
    return x * cos + _rotate(x) * sin


def _rope_backward(dy, cos, sin):
    return dy * cos + _rotate_adjoint(dy * sin)


def _gate_backward(d_h, gate, up):
    """h = silu(gate) * up -> (d_gate, d_up), fp32."""
    sig = torch.sigmoid(gate)
    return d_h * up * sig * (1 + gate * (1 - sig)), d_h * gate * sig


def _heads(x):
    """[F, b, g, npg, d] or [L, b, g, d] -> [b, g, rows, d] with rows = npg * F (head-major) or L."""
    if x.dim() == 5:
        n_f, b, g, npg, d = x.shape
        return x.permute(1, 2, 3, 0, 4).reshape(b, g, npg * n_f, d)
    return x.permute(1, 2, 0, 3)


def _as_flash_output(x, groups: int, head_dim: int):
    """[b, F, n*d] (batch-major rows) -> [b, g, npg*F, d] as `_heads`, laid out as flash lays out its
    output: [b, npg*F, g, d] contiguous, seen transposed. ATen's flash backward makes its output and
    output gradient contiguous in that layout, so any other costs a copy of each per step (at micro-batch
    > 1: 2 x 162 a fam-1b training step at 8k). For one head per group (npg = 1) the step's kept
    projection input is that layout already (no copy here); the output gradient is written in it by
    the conversion to the keys' dtype that runs anyway (one kernel under torch.compile)."""
    b, n_f = x.shape[0], x.shape[1]
    x = x.view(b, n_f, groups, -1, head_dim).permute(0, 3, 1, 2, 4).contiguous()  # [b, npg, F, g, d]
    return x.view(b, -1, groups, head_dim).transpose(1, 2)


def _bmm32(a, b):
    """a @ b over [b, g] with an fp32 result. bf16 operands stay bf16 and accumulate in fp32 on
    the tensor cores (cuBLAS through bmm's out_dtype), as flash attention does; fp32 stays fp32."""
    if a.dtype == torch.float32 or not a.is_cuda:
        return torch.matmul(a.float(), b.float())
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
    return out.view(*a.shape[:-2], *out.shape[-2:])


def _probabilities(q, keys, key_bias, head_dim: int):
    """softmax(q k^T / sqrt(d) + bias) [b, g, npg*F, F + c], fp32."""
    scores = _bmm32(q, keys.transpose(-1, -2)) * head_dim**-0.5
    if key_bias is not None:
        scores = scores + key_bias
    return torch.softmax(scores, dim=-1)


def _attend_backward(d_ctx, p, q, keys, values, head_dim: int):
    """Gradients (fp32) of q, keys, values of p @ values; GQA's sum over a group's heads is the
    matmul's. Operands in the keys' dtype, as in the forward."""
    low = keys.dtype
    d_ctx_low = d_ctx.to(low)
    dp = _bmm32(d_ctx_low, values.transpose(-1, -2))
    ds = (p * (dp - (dp * p).sum(-1, keepdim=True)) * head_dim**-0.5).to(low)
    return _bmm32(ds, keys), _bmm32(ds.transpose(-1, -2), q), _bmm32(p.to(low).transpose(-1, -2), d_ctx_low)


# Flash attention for the steps' attention where it applies (CUDA, bf16/fp16 keys and GEMMs, no key
# bias: every block but a partial last one, and the prompt step); the matrix products above
# elsewhere (CPU, fp32, the partial block). Measured on one H200 (2026-11-30, torch 2.11), one
# step's attention forward and backward over [F + C] = 1,088 keys, 12 heads of 128, in a CUDA
# graph: flash 32.5 / 70.4 us at micro-batch 1 / 4, the products 32.5 / 89.1 us without the
# backward's recompute of p (which flash does not need: it keeps the log-sum-exp). The mem-efficient
# kernel, which takes the bias, took 136 / 278 us. A fam-1b step at 8k, micro-batch 4, ran about 1 %
# faster with it (benchmarks/results/2026-11-30-2xH200, "Session 14"). `benchmarks.train_step
# --scan-attention matmul` turns it off, to measure the two in one run.
FLASH = True


# Which fused kernel runs where FLASH applies: "flash" (ATen's flash attention) or "cudnn" (cuDNN's fused
# attention through ATen, `_cudnn`). Measured on one H200 (benchmarks.step_backends_probe, session 23): one
# layer's steps at fam-1b's shapes, forward and backward in a CUDA graph, 77.4 us a step with cuDNN against 90.8
# with flash at micro-batch 4 (8k and 64k alike), 55.7 against 54.4 at micro-batch 2. In a whole training step
# that did not show: fam-1b at 8k, micro-batch 4 (merged first step), 50.35k tokens/s with cuDNN against 50.53k
# with flash, in separate processes on one machine (benchmarks/results/2026-12-02-1xH200, "Session 24"). So flash
# stays the default. `benchmarks.train_step --scan-attention cudnn` chooses cuDNN. Set it before the first scan runs:
# compiled steps keep what they traced.
FUSED_KERNEL = "flash"


def uses_flash(q, keys, key_bias, dtype: torch.dtype) -> bool:
    return (FLASH and q.is_cuda and key_bias is None and q.dtype in (torch.bfloat16, torch.float16)
            and keys.dtype == q.dtype and dtype == q.dtype and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def _fused(q, kh, vh, head_dim: int):
    """(ctx [b, g, rows, d] in q's dtype, lse [b, g, rows] fp32) of softmax(q k^T / sqrt(d)) v, by the fused
    kernel FUSED_KERNEL names. ctx is laid out as [b, rows, g, d] (flash's own output layout, `_as_flash_output`)."""
    return (_cudnn if FUSED_KERNEL == "cudnn" else _flash)(q, kh, vh, head_dim)


def _fused_backward(d_ctx, q, kh, vh, ctx, lse, head_dim: int):
    """(dq fp32, d_keys, d_values in the kernel's dtype) [b, g, rows or F + c, d] of `_fused` at (q, kh, vh),
    given its output ctx and lse, by the kernel FUSED_KERNEL names. The block rows' key/value gradients go to
    their buffers in that dtype as they are; only the FAM rows' are taken to fp32 (`_attend_rows_backward`)."""
    return (_cudnn_backward if FUSED_KERNEL == "cudnn" else _flash_backward)(d_ctx, q, kh, vh, ctx, lse, head_dim)


def _flash(q, kh, vh, head_dim: int):
    """`_fused` by ATen's flash attention."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, kh, vh, scale=head_dim**-0.5)
    return out[0], out[1]


def _cudnn(q, kh, vh, head_dim: int):
    """`_fused` by cuDNN's kernel. Its output takes q's layout, so q goes in laid out as flash lays out its
    output: the step keeps that output as x_proj, and the backward hands it back in the same layout. Its
    log-sum-exp comes as [b, g, rows, 1]."""
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, kh, vh, None, True, scale=head_dim**-0.5)
    return out[0], out[1].squeeze(-1)


def _cudnn_backward(d_ctx, q, kh, vh, ctx, lse, head_dim: int):
    """`_fused_backward` by cuDNN's kernel: no bias, no dropout (no random state), not variable-length."""
    none = q.new_empty(0, dtype=torch.int64)
    dq, d_keys, d_values = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        d_ctx.to(q.dtype), q, kh, vh, ctx, lse.unsqueeze(-1), none, none, None, None, None, q.shape[2], kh.shape[2],
        0.0, False, scale=head_dim**-0.5)
    return dq.float(), d_keys, d_values


def _flash_backward(d_ctx, q, kh, vh, ctx, lse, head_dim: int):
    """`_fused_backward` by ATen's flash attention: no dropout (no random state), not variable-length (no
    cumulative lengths)."""
    no_rng = q.new_empty(0, dtype=torch.int64)
    dq, d_keys, d_values = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        d_ctx.to(q.dtype), q, kh, vh, ctx, lse, None, None, q.shape[2], kh.shape[2], 0.0, False, no_rng, no_rng,
        scale=head_dim**-0.5)
    return dq.float(), d_keys, d_values


def _rows_to_context(ctx, n_f: int):
    """[b, g, npg*F, d] -> [F, b, n*d] (head index = group * npg + j, megatron's order)."""
    b, g, rows, d = ctx.shape
    return ctx.view(b, g, rows // n_f, n_f, d).permute(3, 0, 1, 2, 4).reshape(n_f, b, -1)


# ---- a step in three parts (FAM rows -> Q/K/V; attention; projection + FFN), each way ----


def _project(fam, n1w, wqkv, eps: float, groups: int, head_dim: int, dtype, enter):
    """(fam in fp32, x1 = the QKV GEMM's input, mixed = its output [F, b, g, npg + 2, d] fp32)."""
    f32 = fam.float()
    x1 = enter((_normalize(f32, eps)[0] * n1w).to(dtype))  # [F, b, h]: all F rows (gathered under SP)
    mixed = F_.linear(x1, wqkv).view(x1.shape[0], x1.shape[1], groups, -1, head_dim).float()
    return f32, x1, mixed


def _attend_rows(mixed, keys, values, key_bias, cos_q, sin_q, head_dim: int, dtype):
    """The FAM rows' queries (RoPE at cos_q, sin_q) over keys/values [F + c, b, g, d]: (q [b, g,
    npg*F, d] in the keys' dtype, context [F, b, n*d] in dtype, lse or None)."""
    q = _heads(_rope(mixed[:, :, :, :-2], cos_q.unsqueeze(3), sin_q.unsqueeze(3))).to(keys.dtype)
    lse = None
    if uses_flash(q, keys, key_bias, dtype):
        ctx, lse = _fused(q, _heads(keys), _heads(values), head_dim)
    else:
        ctx = _bmm32(_probabilities(q, _heads(keys), key_bias, head_dim).to(values.dtype), _heads(values))
    return q, _rows_to_context(ctx, mixed.shape[0]).to(dtype), lse


def _update(context, residual, weights, eps: float, dtype, enter, leave):
    """Projection, residual, norm and SwiGLU FFN: (a, y, gate_up, h_act, the new rows in fp32)."""
    _, _, wproj, n2w, wfc1, wfc2 = weights
    a = leave(F_.linear(context, wproj)).float() + residual
    y = enter((_normalize(a, eps)[0] * n2w).to(dtype))
    gate_up = F_.linear(y, wfc1)
    gate, up = gate_up.float().chunk(2, dim=-1)
    h_act = (F_.silu(gate) * up).to(dtype)
    return a, y, gate_up, h_act, leave(F_.linear(h_act, wfc2)).float() + a


def _keep(saved: Activations, *values) -> None:
    for out, value in zip(saved, values):
        if value is not None:
            out.copy_(value)


def step_forward(fam, keys, values, key_bias, cos_q, sin_q, cos_k, sin_k, scale, weights, saved: Activations,
                 eps: float, groups: int, head_dim: int, dtype: torch.dtype, enter=None, leave=None):
    """F_t from F_{t-1} = fam over keys/values [F + c, b, g, d] (rows F: block t's, see the module
    docstring); scale is the residual's 0-dim factor (0 for the first update, paper B.1). Writes
    F_{t-1}'s K/V into keys[:F], values[:F] and the step's activations into `saved`. Returns F_t
    shaped and typed like fam."""
    enter, leave = enter or _same, leave or _same
    f32, x1, mixed = _project(fam, weights[0], weights[1], eps, groups, head_dim, dtype, enter)
    n_f = x1.shape[0]
    keys[:n_f] = _rope(mixed[:, :, :, -2], cos_k, sin_k)  # also the block queries' FAM keys
    values[:n_f] = mixed[:, :, :, -1]
    q, context, lse = _attend_rows(mixed, keys, values, key_bias, cos_q, sin_q, head_dim, dtype)
    a, y, gate_up, h_act, new = _update(context, scale * f32, weights, eps, dtype, enter, leave)
    _keep(saved, fam, q, a, gate_up, x1, context.transpose(0, 1), y, h_act, lse)  # x_proj batch-major
    return new.to(fam.dtype)


def _update_backward(d_out, a, gate_up, weights, eps: float, dtype, enter, leave):
    """From the gradient of the step's new rows (fp32) back through `_update`: (da, dz, d_gu, dy, xh2,
    do, d_context); dz, d_gu, do are the FFN and projection GEMMs' output gradients."""
    _, _, wproj, n2w, wfc1, wfc2 = weights
    xh2, r2 = _normalize(a, eps)
    gate, up = gate_up.float().chunk(2, dim=-1)
    dz = enter(d_out.to(dtype))  # adjoint of leave
    d_gate, d_up = _gate_backward(F_.linear(dz, wfc2.t()).float(), gate, up)
    d_gu = torch.cat([d_gate, d_up], dim=-1).to(dtype)
    dy = leave(F_.linear(d_gu, wfc1.t())).float()  # adjoint of enter
    da = d_out + _normalize_backward(dy * n2w, xh2, r2)
    do = enter(da.to(dtype))
    return da, dz, d_gu, dy, xh2, do, F_.linear(do, wproj.t()).float()


# shape: `_attend_rows`' inputs and what it kept (its output x_proj and lse)
def _attend_rows_backward(d_context, q, keys, values, key_bias, x_proj, lse, groups: int, head_dim: int, dtype):
    """Back through `_attend_rows`: (dq [F, b, g, npg, d] fp32 before RoPE's backward, d_keys,
    d_values [b, g, F + c, d] as the kernels write them, fp32 or, from flash, in its dtype)."""
    n_f, b = d_context.shape[0], d_context.shape[1]
    kh, vh = _heads(keys), _heads(values)
    if uses_flash(q, keys, key_bias, dtype):  # the forward's output is x_proj, in the heads' layout
        ctx = _as_flash_output(x_proj, groups, head_dim)
        d_ctx = _as_flash_output(d_context.to(q.dtype).transpose(0, 1), groups, head_dim)
        dq, d_keys, d_values = _fused_backward(d_ctx, q, kh, vh, ctx, lse, head_dim)
    else:
        d_ctx = _heads(d_context.view(n_f, b, groups, -1, head_dim))
        p = _probabilities(q, kh, key_bias, head_dim)  # one product: cheaper than keeping p
        dq, d_keys, d_values = _attend_backward(d_ctx, p, q, kh, vh, head_dim)
    return dq.view(b, groups, -1, n_f, head_dim).permute(3, 0, 1, 2, 4), d_keys, d_values


def _mixed_gradient(dq, d_k, d_v, cos_q, sin_q, cos_k, sin_k):
    """The QKV GEMM's output gradient [F, b, g * (npg + 2) * d], fp32, from those of the queries
    (before RoPE's backward), the keys and the values [F, b, g, d] of the FAM rows."""
    n_f, b = dq.shape[0], dq.shape[1]
    return torch.cat([
        _rope_backward(dq, cos_q.unsqueeze(3), sin_q.unsqueeze(3)),
        _rope_backward(d_k, cos_k, sin_k).unsqueeze(3),
        d_v.unsqueeze(3),
    ], dim=3).reshape(n_f, b, -1)


def step_backward(d_new, d_fam_k, d_fam_v, keys, values, key_bias, cos_q, sin_q, cos_k, sin_k, scale, weights,
                  saved: Activations, out: Gradients, out_dk, out_dv, eps: float, groups: int, head_dim: int,
                  dtype: torch.dtype, enter=None, leave=None):
    """Back-propagate d_new (grad of F_t) and d_fam_k, d_fam_v (grads of F_{t-1}'s K/V as the block
    queries read them [F, b, g, d], or None) through the step `step_forward` ran (its `saved`
    activations, the same keys/values). Writes block t's K/V gradients into out_dk, out_dv
    [c, b, g, d] (when given; the layout of the keys/values, in which flash writes them) and the weight
    uses' output gradients into `out`; returns the grad of the step's input FAM."""
    enter, leave = enter or _same, leave or _same
    da, dz, d_gu, dy, xh2, do, d_context = _update_backward(d_new.float(), saved.a, saved.gate_up, weights, eps,
                                                           dtype, enter, leave)
    dq, d_keys, d_values = _attend_rows_backward(d_context, saved.q, keys, values, key_bias, saved.x_proj, saved.lse,
                                                 groups, head_dim, dtype)
    n_f = dq.shape[0]
    if out_dk is not None:  # [c, b, g, d]: from flash, rows F: of its [F + c, b, g, d] gradients, as they lie
        out_dk.copy_(d_keys[:, :, n_f:].permute(2, 0, 1, 3))
        out_dv.copy_(d_values[:, :, n_f:].permute(2, 0, 1, 3))
    d_k_fam, d_v_fam = (x[:, :, :n_f].permute(2, 0, 1, 3).float() for x in (d_keys, d_values))
    if d_fam_k is not None:
        d_k_fam, d_v_fam = d_k_fam + d_fam_k.float(), d_v_fam + d_fam_v.float()
    d_mixed = _mixed_gradient(dq, d_k_fam, d_v_fam, cos_q, sin_q, cos_k, sin_k).to(dtype)
    dx1 = leave(F_.linear(d_mixed, weights[1].t())).float()
    xh1, r1 = _normalize(saved.fam.float(), eps)
    d_fam = scale * da + _normalize_backward(dx1 * weights[0], xh1, r1)
    _keep(out, d_mixed, do.transpose(0, 1), d_gu, dz, (dx1 * xh1).sum((0, 1)), (dy * xh2).sum((0, 1)))
    return d_fam


def weight_gradients(saved: Activations, grads: Gradients, weights):
    """One GEMM per weight over all steps' rows: dW = sum_t dY_t^T X_t = dY^T X over T*F*b rows."""
    n1w, qkv, proj, n2w, fc1, fc2 = weights
    uses = ((saved.x_qkv, grads.d_qkv, qkv), (saved.x_proj, grads.d_proj, proj), (saved.x_fc1, grads.d_fc1, fc1),
            (saved.x_fc2, grads.d_fc2, fc2))
    d_qkv, d_proj, d_fc1, d_fc2 = ((dy.flatten(0, -2).t() @ x.flatten(0, -2)).to(w.dtype) for x, dy, w in uses)
    return grads.d_norm1.sum(0).to(n1w.dtype), d_qkv, d_proj, grads.d_norm2.sum(0).to(n2w.dtype), d_fc1, d_fc2
