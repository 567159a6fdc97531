"""One FAM scan step and its hand-written backward, as plain functions of tensors (the fast scan).

The math is model/scan.py's `fam_step` (the eager oracle), written out so that
  - the forward runs without building an autograd graph, and
  - the backward recomputes the step and returns activation gradients only (to the previous
    FAM, to the block's K/V, and through the FAM K/V the block queries read), plus each weight
    use's (input, output gradient) pair; model/fast_scan.py turns the pairs of all T blocks into
    one weight-gradient GEMM per weight instead of T GEMMs with K = F rows and T additions.
Both are single graphs for torch.compile (no autograd inside), and the same code runs eagerly
on CPU, where tests/test_scan.py checks it against autograd through `fam_step`.

Precision (what autocast does to `fam_step`, minus its per-op casts): the FAM stream, norms,
RoPE, the attention scores and softmax and the gate are fp32; the four GEMMs take `dtype`
(bf16 under autocast). Shapes: fam [F, b, h] (this rank's [F/tp, b, h] under SP), block K/V
[c, b, g, d], RoPE tables [F, b, 1, d]; n heads in g groups of npg, head size d.

Tensor parallelism: `enter` / `leave` are megatron's copy-to / reduce-from region (or, under SP,
gather-from / reduce-scatter-to sequence-parallel region), used as plain collectives here. Each
one's adjoint is the other's forward (identity <-> all-reduce, all-gather <-> reduce-scatter), so
the backward uses `leave` where the forward used `enter` and vice versa.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_


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


def _attend(q, keys, values, head_dim: int):
    """q [b, g, npg*F, d] over keys/values [b, g, L, d] (full attention, fp32) -> (p, context)."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * head_dim**-0.5
    p = torch.softmax(scores, dim=-1)
    return p, torch.matmul(p, values)


def _attend_backward(d_ctx, p, q, keys, values, head_dim: int):
    """Gradients of q, keys, values of `_attend`; GQA's sum over a group's heads is the matmul's."""
    dp = torch.matmul(d_ctx, values.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * head_dim**-0.5
    return torch.matmul(ds, keys), torch.matmul(ds.transpose(-1, -2), q), torch.matmul(p.transpose(-1, -2), d_ctx)


def _rows_to_context(ctx, n_f: int):
    """[b, g, npg*F, d] -> [F, b, n*d] (head index = group * npg + j, megatron's order)."""
    b, g, rows, d = ctx.shape
    return ctx.view(b, g, rows // n_f, n_f, d).permute(3, 0, 1, 2, 4).reshape(n_f, b, -1)


def _forward_parts(fam, bk, bv, cos_q, sin_q, cos_k, sin_k, scale, weights, eps, groups, head_dim, dtype, enter, leave):
    """The step, keeping what its backward needs."""
    n1w, wqkv, wproj, n2w, wfc1, wfc2 = weights
    f32 = fam.float()
    xh1, r1 = _normalize(f32, eps)
    x1 = enter((xh1 * n1w).to(dtype))  # [F, b, h]: all F rows (gathered under SP)
    n_f, b = x1.shape[0], x1.shape[1]
    mixed = F_.linear(x1, wqkv).view(n_f, b, groups, -1, head_dim).float()  # [F, b, g, npg + 2, d]
    q = _rope(mixed[:, :, :, :-2], cos_q.unsqueeze(3), sin_q.unsqueeze(3))  # [F, b, g, npg, d]
    k = _rope(mixed[:, :, :, -2], cos_k, sin_k)  # [F, b, g, d]
    v = mixed[:, :, :, -1]
    qh = _heads(q)
    keys = _heads(k if bk is None else torch.cat([k, bk.float()]))  # [b, g, F + c, d]
    values = _heads(v if bv is None else torch.cat([v, bv.float()]))
    p, ctx = _attend(qh, keys, values, head_dim)
    context = _rows_to_context(ctx, n_f).to(dtype)  # [F, b, n*d]
    a = leave(F_.linear(context, wproj)).float() + scale * f32
    xh2, r2 = _normalize(a, eps)
    y = enter((xh2 * n2w).to(dtype))
    gate, up = F_.linear(y, wfc1).float().chunk(2, dim=-1)
    h_act = (F_.silu(gate) * up).to(dtype)
    new_fam = (leave(F_.linear(h_act, wfc2)).float() + a).to(fam.dtype)
    saved = dict(xh1=xh1, r1=r1, x1=x1, qh=qh, keys=keys, values=values, p=p, context=context,
                 xh2=xh2, r2=r2, y=y, gate=gate, up=up, h_act=h_act)
    return new_fam, k, v, saved


def step_forward(fam, bk, bv, cos_q, sin_q, cos_k, sin_k, scale, weights, eps: float, groups: int, head_dim: int,
                 dtype: torch.dtype, enter=None, leave=None, out_k=None, out_v=None):
    """F_t from F_{t-1} = fam over block K/V (bk, bv; None for the soft-prompt stream's step, whose
    rows attend only among themselves); scale is the residual's 0-dim factor (0 for the first
    update, paper B.1). Writes F_{t-1}'s K/V (the block queries' FAM keys, post-RoPE)
    into out_k, out_v [F, b, g, d] when given. Returns F_t shaped and typed like fam."""
    new_fam, k, v, _ = _forward_parts(fam, bk, bv, cos_q, sin_q, cos_k, sin_k, scale, weights, eps, groups,
                                      head_dim, dtype, enter or _same, leave or _same)
    if out_k is not None:
        out_k.copy_(k)
        out_v.copy_(v)
    return new_fam


def step_backward(fam, bk, bv, cos_q, sin_q, cos_k, sin_k, scale, weights, eps: float, groups: int, head_dim: int,
                  dtype: torch.dtype, enter=None, leave=None, d_new=None, d_k=None, d_v=None, out_dbk=None,
                  out_dbv=None):
    """Recompute the step and back-propagate d_new (grad of F_t) and d_k, d_v (grads of the FAM
    K/V the block queries read, or None). Writes the block K/V gradients into out_dbk, out_dbv
    and returns (grad of fam, weight pairs (input, output grad) for qkv, proj, fc1, fc2 [rows, b,
    features] in `dtype`, per-block norm weight gradients n1, n2 [h] fp32)."""
    enter, leave = enter or _same, leave or _same
    n1w, wqkv, wproj, n2w, wfc1, wfc2 = weights
    _, _, _, s = _forward_parts(fam, bk, bv, cos_q, sin_q, cos_k, sin_k, scale, weights, eps, groups, head_dim,
                                dtype, enter, leave)
    n_f, b = s["x1"].shape[0], s["x1"].shape[1]
    d_new = d_new.float()
    dz = enter(d_new.to(dtype))  # adjoint of leave
    d_gate, d_up = _gate_backward(F_.linear(dz, wfc2.t()).float(), s["gate"], s["up"])
    d_gu = torch.cat([d_gate, d_up], dim=-1).to(dtype)
    dy = leave(F_.linear(d_gu, wfc1.t())).float()  # adjoint of enter
    da = d_new + _normalize_backward(dy * n2w, s["xh2"], s["r2"])
    do = enter(da.to(dtype))
    d_ctx = F_.linear(do, wproj.t()).float().view(n_f, b, groups, -1, head_dim)
    dq, d_keys, d_values = _attend_backward(_heads(d_ctx), s["p"], s["qh"], s["keys"],
                                            s["values"], head_dim)
    d_keys, d_values = d_keys.permute(2, 0, 1, 3), d_values.permute(2, 0, 1, 3)  # [F + c, b, g, d]
    if out_dbk is not None:
        out_dbk.copy_(d_keys[n_f:])
        out_dbv.copy_(d_values[n_f:])
    d_k_fam, d_v_fam = d_keys[:n_f], d_values[:n_f]
    if d_k is not None:
        d_k_fam, d_v_fam = d_k_fam + d_k.float(), d_v_fam + d_v.float()
    npg = dq.shape[2] // n_f
    dq = dq.view(b, groups, npg, n_f, head_dim).permute(3, 0, 1, 2, 4)  # [F, b, g, npg, d]
    d_mixed = torch.cat([
        _rope_backward(dq, cos_q.unsqueeze(3), sin_q.unsqueeze(3)),
        _rope_backward(d_k_fam, cos_k, sin_k).unsqueeze(3),
        d_v_fam.unsqueeze(3),
    ], dim=3).reshape(n_f, b, -1).to(dtype)
    dx1 = leave(F_.linear(d_mixed, wqkv.t())).float()
    d_fam = scale * da + _normalize_backward(dx1 * n1w, s["xh1"], s["r1"])
    pairs = ((s["x1"], d_mixed), (s["context"], do), (s["y"], d_gu), (s["h_act"], dz))
    norms = ((dx1 * s["xh1"]).sum((0, 1)), (dy * s["xh2"]).sum((0, 1)))
    return d_fam, pairs, norms
