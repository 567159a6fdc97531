"""Block 0's FAM step and the soft-prompt stream's step as one step over 2F rows (the fast scan, from
the prompt, at TP = 1).

From the prompt, both steps start from the same rows: F_0 is the prompt (model/layer.py), and the
prompt stream's step is a FAM step over no block (its rows attend only among themselves at the F
positions before block 0). So they share
  - x1 = norm(F_0) and the QKV GEMM over its F rows, and the keys and values that come out of it:
    F_0's keys at the F positions before block 0 are the prompt's keys at its own positions;
and differ only in
  - the queries' RoPE (block 0's FAM queries at the block's last F positions, the prompt's at
    its own) and what they attend to (F_0 and block 0's keys; F_0's keys only),
  - the residual's factor (0 for block 0's first update, paper B.1; 1 for the prompt).
After the attention, projection, norm and FFN are row-wise: one GEMM each over both steps' 2F rows.
Where the scan's F-row GEMMs are bound by reading the weights (micro-batch 1 on an H200), the merged
step reads each weight once where the two steps read it twice, and runs one step's kernels, not two.
Its math is `step_forward` / `step_backward` (model/scan_step.py), composed from the same parts; it
keeps its activations and writes its output gradients into the two steps' slots, as the two steps
did, so the weight gradients (model/fast_scan.py) are unchanged. tests/test_scan.py checks it against
the eager scan, where the two steps stay apart.

Not under tensor parallelism: with sequence parallelism a rank holds F/tp of the rows and the
projection's reduce-scatter would split 2F rows across ranks, not F and F.
"""

from __future__ import annotations

import torch

from model.scan_step import (Activations, Gradients, _attend_rows, _attend_rows_backward, _fam_keys, _keep,
                             _mixed_gradient, _normalize, _normalize_backward, _project, _same, _update,
                             _update_backward)


def first_step_forward(fam, keys, values, key_bias, prompt_keys, prompt_values, cos_q, sin_q, cos_k, sin_k, scales,
                       weights, saved: Activations, saved_prompt: Activations, eps: float, groups: int,
                       head_dim: int, dtype: torch.dtype):
    """(F_1, the prompt stream's output) from fam = F_0 = the prompt [F, b, h]: block 0's step over
    keys/values [F + C, b, g, d] and the prompt's over prompt_keys/values [F, b, g, d], whose rows
    :F it writes (the same F_0 K/V). scales: [2], block 0's residual factor then the prompt's.
    cos_k, sin_k: the F positions before block 0. Keeps each step's activations in its slot."""
    f32, x1, mixed = _project(fam, weights[0], weights[1], eps, groups, head_dim, dtype, _same)
    n_f = x1.shape[0]
    k, v = _fam_keys(mixed, cos_k, sin_k)
    keys[:n_f], values[:n_f] = k, v
    prompt_keys.copy_(k)
    prompt_values.copy_(v)
    q, context, lse = _attend_rows(mixed, keys, values, key_bias, cos_q, sin_q, head_dim, dtype)
    q_p, context_p, lse_p = _attend_rows(mixed, prompt_keys, prompt_values, None, cos_k, sin_k, head_dim, dtype)
    residual = torch.cat([scales[0] * f32, scales[1] * f32])
    a, y, gate_up, h_act, new = _update(torch.cat([context, context_p]), residual, weights, eps, dtype, _same, _same)
    for rows, kept, (q_, context_, lse_) in ((slice(None, n_f), saved, (q, context, lse)),
                                            (slice(n_f, None), saved_prompt, (q_p, context_p, lse_p))):
        _keep(kept, fam, q_, a[rows], gate_up[rows], x1, context_, y[rows], h_act[rows], lse_)
    return new[:n_f].to(fam.dtype), new[n_f:].to(fam.dtype)


def first_step_backward(d_new, d_prompt, d_fam_k, d_fam_v, keys, values, key_bias, prompt_keys, prompt_values, cos_q,
                        sin_q, cos_k, sin_k, scales, weights, saved: Activations, saved_prompt: Activations,
                        out: Gradients, out_prompt: Gradients, out_dk, out_dv, eps: float, groups: int,
                        head_dim: int, dtype: torch.dtype):
    """Back through `first_step_forward`: d_new, d_prompt are the gradients of its two outputs,
    d_fam_k/v those of F_0's K/V as block 0's queries read them [F, b, g, d]. Writes block 0's K/V
    gradients into out_dk, out_dv and each step's weight uses' output gradients into its slot (the
    QKV GEMM's split by the step that used its rows; norm1's all in block 0's slot); returns the
    gradient of F_0."""
    n_f = d_new.shape[0]
    d_out = torch.cat([d_new, d_prompt]).float()
    a, gate_up = torch.cat([saved.a, saved_prompt.a]), torch.cat([saved.gate_up, saved_prompt.gate_up])
    da, dz, d_gu, dy, xh2, do, d_context = _update_backward(d_out, a, gate_up, weights, eps, dtype, _same, _same)
    dq, d_keys, d_values = _attend_rows_backward(d_context[:n_f], saved.q, keys, values, key_bias, saved.x_proj,
                                                 saved.lse, groups, head_dim, dtype)
    dq_p, dk_p, dv_p = _attend_rows_backward(d_context[n_f:], saved_prompt.q, prompt_keys, prompt_values, None,
                                             saved_prompt.x_proj, saved_prompt.lse, groups, head_dim, dtype)
    out_dk.copy_(d_keys[n_f:])
    out_dv.copy_(d_values[n_f:])
    d_k = d_keys[:n_f].float() + d_fam_k.float()
    d_v = d_values[:n_f].float() + d_fam_v.float()
    d_mixed = _mixed_gradient(dq, d_k, d_v, cos_q, sin_q, cos_k, sin_k)
    d_mixed_p = _mixed_gradient(dq_p, dk_p.float(), dv_p.float(), cos_k, sin_k, cos_k, sin_k)
    dx1 = torch.nn.functional.linear((d_mixed + d_mixed_p).to(dtype), weights[1].t()).float()
    xh1, r1 = _normalize(saved.fam.float(), eps)
    d_fam = scales[0] * da[:n_f] + scales[1] * da[n_f:] + _normalize_backward(dx1 * weights[0], xh1, r1)
    d_norm2 = dy * xh2
    _keep(out, d_mixed.to(dtype), do[:n_f], d_gu[:n_f], dz[:n_f], (dx1 * xh1).sum((0, 1)), d_norm2[:n_f].sum((0, 1)))
    _keep(out_prompt, d_mixed_p.to(dtype), do[n_f:], d_gu[n_f:], dz[n_f:], torch.zeros_like(out_prompt.d_norm1),
          d_norm2[n_f:].sum((0, 1)))
    return d_fam
