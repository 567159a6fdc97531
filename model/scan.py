"""One step of the FAM scan (Algorithm 2's FAM rows), as a single function of tensors.

Only F rows per block go through the recurrence, so the scan is many small operations; run
through megatron's Linear modules each costs more in Python than on the GPU. Here the step is
one function of plain tensors (the layer's own weights, no new ones), differentiated by
autograd: the readable form, kept as the oracle of the fast scan.

    x       = PreNorm(F_{t-1})
    q, k, v = QKV(x)                          RoPE: q at block t's last F positions,
                                              k at the F positions before block t
    context = Attn(q, [k; K_t], [v; V_t])     full attention over [F_{t-1}; block t]
    A       = Proj(context) + F_{t-1}         (a zero residual for the very first update)
    F_t     = FF(PreNorm(A)) + A              SwiGLU, the layer's own FFN
Tensor parallelism: `enter` / `leave` are megatron's copy-to / reduce-from tensor-parallel
region (identity when TP = 1), exactly what ColumnParallelLinear / RowParallelLinear do.

`eager_scan` runs the step block by block under autograd: the CPU path and the oracle of the
fast scan (model/fast_scan.py), which the GPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from model.rope import apply_rope


def fam_step(
    fam, block_k, block_v, cos_q, sin_q, cos_k, sin_k, residual_scale: float,
    norm1_w, qkv_w, proj_w, norm2_w, fc1_w, fc2_w, eps: float, groups: int, head_dim: int,
    enter=None, leave=None,
):
    """fam [F, b, h] (this rank's [F/tp, b, h] under SP); block_k, block_v [c, b, g, d]
    (post-RoPE); cos/sin [F, b, 1, d]. Returns (F_t shaped like fam, k, v of F_{t-1} [F, b, g, d]
    for the block queries)."""
    enter = enter or (lambda t: t)
    leave = leave or (lambda t: t)
    h = fam.shape[-1]
    x = enter(F_.rms_norm(fam, (h,), norm1_w, eps))  # all F rows (gathered under SP)
    n_f, b = x.shape[0], x.shape[1]
    mixed = F_.linear(x, qkv_w).view(n_f, b, groups, -1, head_dim)  # [F, b, g, n/g + 2, d]
    q = apply_rope(mixed[:, :, :, :-2].reshape(n_f, b, -1, head_dim), cos_q, sin_q)
    k = apply_rope(mixed[:, :, :, -2], cos_k, sin_k)
    v = mixed[:, :, :, -1]
    keys, values = torch.cat([k, block_k]), torch.cat([v, block_v])
    context = F_.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3), enable_gqa=True
    )  # [b, n, F, d]
    context = context.permute(2, 0, 1, 3).reshape(n_f, b, -1)
    a = leave(F_.linear(context, proj_w)) + residual_scale * fam
    y = enter(F_.rms_norm(a, (h,), norm2_w, eps))
    gate, up = F_.linear(y, fc1_w).chunk(2, dim=-1)
    new_fam = leave(F_.linear(F_.silu(gate) * up, fc2_w)) + a
    return new_fam, k, v


def eager_scan(spec, fam0, k, v, rope, weights):
    """The scan block by block under autograd, the CPU path and the oracle of model/fast_scan.py
    (same arguments and results as `fast_scan`): the block attention's keys and values [R + S, b,
    g, d], every block's FAM K/V, zero rows up to R, then k or v."""
    cos_q, sin_q, cos_k, sin_k = rope
    C, T, F = spec.block_size, cos_q.shape[0], cos_q.shape[1]
    step_args = (*weights, spec.eps, spec.groups, spec.head_dim, spec.enter, spec.leave)
    prompt_out = None
    if spec.from_prompt:  # the prompt rows attend only among themselves: a step over no block
        prompt_out = fam_step(fam0, k[:0], v[:0], cos_k[0], sin_k[0], cos_k[0], sin_k[0], 1.0, *step_args)[0]
    fam, fam_k, fam_v = fam0, [], []
    for t in range(T):
        first_update = t == 0 and spec.from_prompt  # paper B.1: no residual
        fam, fk, fv = fam_step(fam, k[t * C : (t + 1) * C], v[t * C : (t + 1) * C], cos_q[t], sin_q[t], cos_k[t],
                               sin_k[t], 0.0 if first_update else 1.0, *step_args)
        fam_k.append(fk)
        fam_v.append(fv)
    pad = [k.new_zeros(spec.fam_rows - T * F, *k.shape[1:])]
    return fam, torch.cat(fam_k + pad + [k]), torch.cat(fam_v + pad + [v]), prompt_out
