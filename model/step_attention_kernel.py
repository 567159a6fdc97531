"""The backward of a fast-scan step's attention as one Triton kernel (issue 13), for CUDA.

A step's F FAM queries attend [F_{t-1}; block t] (F + C keys; model/scan_step.py). Its backward gives
dQ, the FAM rows' dK, dV (they feed the recurrence, fp32) and the block rows' dK, dV (an output, into
the scan's buffers [C, b, g, d]). Through ATen's flash attention that was four kernels a step (its
dot(dO, O), the backward, dQ's conversion, then a copy of the block rows out of flash's [F + C] rows
into the buffers): 47 + 22 us of a ~207 us backward step at fam-1b 8k, micro-batch 4 (H200, session 22).
This kernel writes every output where it goes, in its dtype, with no copy:
  - one program per BLOCK_N keys of one (sequence, query group); it loads its keys and values once and
    loops over the group's query rows (npg * F) in BLOCK_M tiles;
  - p = exp(q k^T * scale - lse) with the forward's log-sum-exp (flash's), ds = p * (dO v^T - delta),
    delta = rowsum(dO * O) (given); dV = p^T dO, dK = ds^T q * scale, as flash does (bf16 operands,
    fp32 accumulation);
  - dQ = ds k * scale, summed over the programs of a group by fp32 atomic adds into a zeroed buffer.
`attention_backward_reference` is the same contract in plain PyTorch: the CPU's path (tests run the
scan's loop through it) and the oracle tests/test_step_attention_kernel.py checks the kernel against,
in Triton's interpreter on CPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: the reference runs
    triton = None

# Tiles: BLOCK_N keys a program (its dK, dV accumulate in fp32 registers: 64 x 128 x 2 at d = 128) and BLOCK_M query
# rows at a time; 4 warps. Chosen without tuning (2026-12-02): benchmarks.step_backends_probe times them on a GPU.
BLOCK_M, BLOCK_N, NUM_WARPS = 32, 64, 4


def _outputs(q, keys, n_f: int):
    b, g, rows, d = q.shape
    dq = torch.zeros(b, g, rows, d, device=q.device, dtype=torch.float32)
    d_fam_k, d_fam_v = (torch.empty(b, g, n_f, d, device=q.device, dtype=torch.float32) for _ in range(2))
    return dq, d_fam_k, d_fam_v


def attention_backward_reference(d_ctx, q, keys, values, lse, delta, n_f: int, scale: float, out_dk=None,
                                 out_dv=None):
    """(dq [b, g, rows, d], the FAM rows' d_k, d_v [b, g, F, d]) fp32 of softmax(q k^T scale) v at q
    [b, g, rows, d] and keys, values [F + c, b, g, d], given the output gradient d_ctx [b, g, rows, d],
    the forward's log-sum-exp lse and delta = rowsum(d_ctx * out) [b, g, rows] fp32. Writes the block
    rows' dK, dV into out_dk, out_dv [c, b, g, d] when given."""
    kh, vh = (x.permute(1, 2, 0, 3).float() for x in (keys, values))  # [b, g, F + c, d]
    qf, dof = q.float(), d_ctx.float()
    p = torch.exp(qf @ kh.transpose(-1, -2) * scale - lse[..., None])
    ds = p * (dof @ vh.transpose(-1, -2) - delta[..., None])
    low = q.dtype  # the matrix products' operands in the keys' dtype, as flash's
    d_k = (ds.to(low).float().transpose(-1, -2) @ qf) * scale
    d_v = p.to(low).float().transpose(-1, -2) @ dof
    dq = (ds.to(low).float() @ kh) * scale
    if out_dk is not None:
        out_dk.copy_(d_k[:, :, n_f:].permute(2, 0, 1, 3))
        out_dv.copy_(d_v[:, :, n_f:].permute(2, 0, 1, 3))
    return dq, d_k[:, :, :n_f].contiguous(), d_v[:, :, :n_f].contiguous()


if triton is not None:

    @triton.jit
    def _backward_kernel(Q, K, V, DO, LSE, DELTA, DQ, DKF, DVF, DKB, DVB,
                         s_qb, s_qg, s_qm, s_kn, s_kb, s_kg, s_ob, s_og, s_om, s_lb, s_lg,
                         s_fb, s_fg, s_fn, s_cn, s_cb, s_cg,
                         G, NF, NKEYS, scale, ROWS: tl.constexpr,
                         HAS_BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
        pid_n, pid_bg = tl.program_id(0), tl.program_id(1)
        bi, gi = pid_bg // G, pid_bg % G
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        in_keys = offs_n < NKEYS
        kv = offs_n[:, None] * s_kn + bi * s_kb + gi * s_kg + offs_d[None, :]
        k = tl.load(K + kv, mask=in_keys[:, None], other=0.0)
        v = tl.load(V + kv, mask=in_keys[:, None], other=0.0)
        dk = tl.zeros([BN, D], dtype=tl.float32)
        dv = tl.zeros([BN, D], dtype=tl.float32)
        for m0 in range(0, ROWS, BM):
            offs_m = m0 + tl.arange(0, BM)
            in_rows = offs_m < ROWS
            q = tl.load(Q + bi * s_qb + gi * s_qg + offs_m[:, None] * s_qm + offs_d[None, :], mask=in_rows[:, None],
                        other=0.0)
            do = tl.load(DO + bi * s_ob + gi * s_og + offs_m[:, None] * s_om + offs_d[None, :],
                         mask=in_rows[:, None], other=0.0)
            lse = tl.load(LSE + bi * s_lb + gi * s_lg + offs_m, mask=in_rows, other=0.0)
            delta = tl.load(DELTA + bi * s_lb + gi * s_lg + offs_m, mask=in_rows, other=0.0)
            p = tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None])
            p = tl.where(in_rows[:, None] & in_keys[None, :], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            dq = tl.dot(ds.to(k.dtype), k) * scale
            tl.atomic_add(DQ + bi * s_qb + gi * s_qg + offs_m[:, None] * s_qm + offs_d[None, :], dq,
                          mask=in_rows[:, None])
        dk = dk * scale
        fam = offs_n < NF
        fam_at = bi * s_fb + gi * s_fg + offs_n[:, None] * s_fn + offs_d[None, :]
        tl.store(DKF + fam_at, dk, mask=fam[:, None])
        tl.store(DVF + fam_at, dv, mask=fam[:, None])
        if HAS_BLOCK:
            block = in_keys & (offs_n >= NF)
            block_at = (offs_n - NF)[:, None] * s_cn + bi * s_cb + gi * s_cg + offs_d[None, :]
            tl.store(DKB + block_at, dk.to(DKB.dtype.element_ty), mask=block[:, None])
            tl.store(DVB + block_at, dv.to(DVB.dtype.element_ty), mask=block[:, None])


def attention_backward(d_ctx, q, keys, values, lse, delta, n_f: int, scale: float, out_dk=None, out_dv=None):
    """`attention_backward_reference`'s contract as one Triton kernel launch (q contiguous in its last
    dim; the dQ buffer takes q's strides)."""
    if triton is None:
        raise RuntimeError("model/step_attention_kernel.py needs Triton (pip install triton), which CUDA "
                           "builds of torch bring")
    b, g, rows, d = q.shape
    n_keys = keys.shape[0]
    dq, d_fam_k, d_fam_v = _outputs(q, keys, n_f)
    q, d_ctx = q.contiguous(), d_ctx.contiguous()
    lse, delta = lse.contiguous(), delta.contiguous()
    has_block = out_dk is not None
    block_k, block_v = (out_dk, out_dv) if has_block else (d_fam_k, d_fam_v)  # unused pointers without a block
    cs = block_k.stride() if has_block else (0, 0, 0, 0)
    grid = (triton.cdiv(n_keys, BLOCK_N), b * g)
    _backward_kernel[grid](
        q, keys, values, d_ctx, lse, delta, dq, d_fam_k, d_fam_v, block_k, block_v,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        d_ctx.stride(0), d_ctx.stride(1), d_ctx.stride(2), lse.stride(0), lse.stride(1),
        d_fam_k.stride(0), d_fam_k.stride(1), d_fam_k.stride(2), cs[0], cs[1], cs[2],
        g, n_f, n_keys, scale, ROWS=rows, HAS_BLOCK=has_block, BM=BLOCK_M, BN=BLOCK_N, D=d, num_warps=NUM_WARPS)
    return dq, d_fam_k, d_fam_v
