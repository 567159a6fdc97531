"""The scan's first step and the soft-prompt stream's step as one (model/fast_scan.py MERGED_FIRST_STEP).

From the prompt (no passed-in state), step 0 and the prompt step start from the same rows, the prompt P
(F_0 = P, model/layer.py):
  - step 0: P's queries (RoPE at block 0's last F positions) over [P's keys; block 0], then the
    projection and the FFN, residual scale 0 (paper B.1);
  - the prompt step: P's queries at the F positions before block 0 over P's keys alone, then the
    projection and the FFN, residual scale 1: the next layer's P.
Both read the same norm and QKV GEMM of the same rows, and P's keys and values are the same in both. Run
as two steps, the QKV GEMM runs twice and every kernel of a step twice: a fam-1b training step at 8k runs
18 prompt steps each way beside the 144 block steps, about 5.8 ms of 52 ms of scan steps (H200, session
22's trace). Here one step does the norm and the QKV GEMM once, the two attentions, and the projection and
the FFN over the 2F rows at once (GEMMs of twice the rows). The backward sums the two paths' gradients of
P's queries, keys and values before one QKV GEMM: the prompt slot's QKV and norm1 output gradients are
zero, so the scan's weight-gradient GEMMs (model/scan_step.py `weight_gradients`) sum the same total.
Math and precision are model/scan_step.py's; tests/test_scan.py checks the loop with it against the eager
scan. At tensor-parallel size 1 only (no `enter` / `leave`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from model.scan_step import (Activations, Gradients, _attend_rows, _attend_rows_backward, _keep, _normalize,
                             _normalize_backward, _project, _rope, _rope_backward, _same, _update, _update_backward)


def step_forward_first(fam, keys, values, key_bias, prompt_keys, prompt_values, tables, scales, weights,
                       saved: Activations, saved_prompt: Activations, eps: float, groups: int, head_dim: int,
                       dtype: torch.dtype):
    """(F_1, the prompt stream's output) from P = fam [F, b, h]: step 0 over keys/values [F + c, b, g, d] (block
    0's; P's K/V written into rows :F and into prompt_keys, prompt_values [F, b, g, d]) and the prompt step.
    tables: block 0's (cos_q, sin_q, cos_k, sin_k) [F, b, 1, d], the prompt's queries and keys at cos_k, sin_k;
    scales: the residual factors (step 0's, the prompt step's). Each step's activations go to its own slot."""
    cos_q, sin_q, cos_k, sin_k = tables
    f32, x1, mixed = _project(fam, weights[0], weights[1], eps, groups, head_dim, dtype, _same)
    n_f = x1.shape[0]
    fam_k, fam_v = _rope(mixed[:, :, :, -2], cos_k, sin_k), mixed[:, :, :, -1]
    keys[:n_f], values[:n_f] = fam_k, fam_v
    prompt_keys.copy_(fam_k)
    prompt_values.copy_(fam_v)
    q0, context0, lse0 = _attend_rows(mixed, keys, values, key_bias, cos_q, sin_q, head_dim, dtype)
    qp, context_p, lse_p = _attend_rows(mixed, prompt_keys, prompt_values, None, cos_k, sin_k, head_dim, dtype)
    residual = torch.cat([scales[0] * f32, scales[1] * f32])
    a, y, gate_up, h_act, new = _update(torch.cat([context0, context_p]), residual, weights, eps, dtype, _same, _same)
    for out, rows, q, context, lse in ((saved, slice(0, n_f), q0, context0, lse0),
                                       (saved_prompt, slice(n_f, None), qp, context_p, lse_p)):
        _keep(out, fam, q, a[rows], gate_up[rows], x1, context.transpose(0, 1), y[rows], h_act[rows], lse)
    new = new.to(fam.dtype)
    return new[:n_f], new[n_f:]


def step_backward_first(d_new, d_prompt, d_fam_k, d_fam_v, keys, values, key_bias, prompt_keys, prompt_values,
                        tables, scales, weights, saved: Activations, saved_prompt: Activations, out: Gradients,
                        out_prompt: Gradients, out_dk, out_dv, eps: float, groups: int, head_dim: int,
                        dtype: torch.dtype):
    """Back through `step_forward_first`, given the gradients of F_1 (d_new) and of the prompt stream's output
    (d_prompt) and those of P's K/V as block 0's queries read them (d_fam_k, d_fam_v [F, b, g, d]): the gradient
    of P. Writes block 0's K/V gradients into out_dk, out_dv and each step's GEMM output gradients into its
    slot of `out` (the QKV GEMM's, and norm1's, all in step 0's)."""
    cos_q, sin_q, cos_k, sin_k = tables
    n_f, b = d_new.shape[0], d_new.shape[1]
    a, gate_up = (torch.cat([getattr(saved, n), getattr(saved_prompt, n)]) for n in ("a", "gate_up"))
    da, dz, d_gu, dy, xh2, do, d_context = _update_backward(torch.cat([d_new, d_prompt]).float(), a, gate_up,
                                                           weights, eps, dtype, _same, _same)
    dq0, dk0, dv0 = _attend_rows_backward(d_context[:n_f], saved.q, keys, values, key_bias, saved.x_proj, saved.lse,
                                          groups, head_dim, dtype)
    dqp, dkp, dvp = _attend_rows_backward(d_context[n_f:], saved_prompt.q, prompt_keys, prompt_values, None,
                                          saved_prompt.x_proj, saved_prompt.lse, groups, head_dim, dtype)
    out_dk.copy_(dk0[:, :, n_f:].permute(2, 0, 1, 3))
    out_dv.copy_(dv0[:, :, n_f:].permute(2, 0, 1, 3))
    d_k, d_v = ((x0[:, :, :n_f] + xp).permute(2, 0, 1, 3).float() + extra.float()
                for x0, xp, extra in ((dk0, dkp, d_fam_k), (dv0, dvp, d_fam_v)))
    d_q = (_rope_backward(dq0, cos_q.unsqueeze(3), sin_q.unsqueeze(3))
           + _rope_backward(dqp, cos_k.unsqueeze(3), sin_k.unsqueeze(3)))
    d_mixed = torch.cat([d_q, _rope_backward(d_k, cos_k, sin_k).unsqueeze(3), d_v.unsqueeze(3)],
                        dim=3).reshape(n_f, b, -1).to(dtype)
    dx1 = F_.linear(d_mixed, weights[1].t()).float()
    xh1, r1 = _normalize(saved.fam.float(), eps)
    d_fam = scales[0] * da[:n_f] + scales[1] * da[n_f:] + _normalize_backward(dx1 * weights[0], xh1, r1)
    d_norm1 = (dx1 * xh1).sum((0, 1))
    zeros = torch.zeros_like(d_mixed), torch.zeros_like(d_norm1)
    for slot, rows, qkv, norm1 in ((out, slice(0, n_f), d_mixed, d_norm1), (out_prompt, slice(n_f, None), *zeros)):
        _keep(slot, qkv, do[rows].transpose(0, 1), d_gu[rows], dz[rows], norm1, (dy[rows] * xh2[rows]).sum((0, 1)))
    return d_fam
