"""The fast FAM scan: one autograd node for a layer's whole scan (all T blocks), issue 13.

model/scan.py's eager scan calls `fam_step` once per block under autograd: T autograd nodes per
layer, each producing a weight-sized gradient per weight (a GEMM with K = F rows) that autograd
then adds up, T times per weight and layer. Measured on one H200 (fam-1b, 64k tokens): 6,891
weight-sized elementwise kernels and 2,340 small-K GEMMs per step, and the GPU idle 45 % of the
step while Python dispatched the per-block calls.

`FAMScan` instead:
  - forward: runs the T steps of model/scan_step.py without autograd, writes every block's FAM
    K/V straight into one [R, b, g, d] buffer (the keys the block attention reads, R = T*F
    padded to a tile, model/masks.py) and saves only each step's input FAM [T, F, b, h] (plus
    the K/V and weights, which are alive anyway);
  - backward: walks the blocks in reverse, recomputing each step, and back-propagates
    activation gradients only (to the previous FAM, to the block's K/V, to the initial FAM: the
    prompt rows or a passed-in state), collecting each weight use's (input, output gradient)
    pair; after the loop each weight's gradient is ONE GEMM over all T*F*b rows (norm weights:
    one sum), as cuDNN's RNNs do.
The soft-prompt stream's step (the prompt rows attending among themselves, model/layer.py) is a
step over no block, run inside the same node so its weight uses join the same GEMMs.

On CUDA each full-block step (forward, and recompute + backward) is one torch.compile'd graph
(static shapes, the same graph for every block and layer), so a step costs one guard check and
its fused kernels instead of an autograd node per op and per weight. A partial last block runs
the same functions uncompiled: one graph per partial length would exhaust the shape budget
(model/compile_limits.py) on evaluation across lengths. On CPU everything runs uncompiled: the
same code path, which tests/test_scan.py checks against the eager per-step autograd scan.

Measured on one H200 (benchmarks.train_step --profile, bf16, micro-batch 1, vocab 32k), against
the per-block compiled step under autograd it replaces (issue 13's figures, same card type):
  fam-1b 64k (recompute): 14.6k -> 23.6k tokens/s (0.44 -> 0.71 x bswa-1b), GPU busy 55 -> 92 %;
  fam-1b 8k:              23.4k -> 19.5k tokens/s (0.57 -> 0.49 x bswa-1b), GPU busy 74 -> 63 %,
                          12.3k kernels per step (bswa-1b: 2.4k), kernel time 266 ms (bswa 195).
At 8k the step is bound by the CPU launching ~26 kernels per compiled call (324 calls per step):
the recompute in backward adds a forward's kernels per block. TODO(issue 13): capture each
layer's loop of compiled steps in a CUDA graph (static buffers), and move the step's fp32
attention matmuls (486 launches, 14.6 ms per step at 8k; 152 ms at 64k) to bf16 operands.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from model.compile_limits import bounded_compiles
from model.scan_step import step_backward, step_forward


@dataclass
class ScanSpec:
    """What the scan needs besides its differentiable inputs."""

    block_size: int  # C
    from_prompt: bool  # no passed-in state: the prompt's own step runs, the first residual is zero
    fam_rows: int  # R >= T*F rows of the FAM key/value buffer (model/masks.py)
    eps: float
    groups: int  # query groups on this rank
    head_dim: int
    dtype: torch.dtype  # the GEMMs' dtype (bf16 under autocast)
    enter: Callable | None = None  # tensor-parallel mappings (model/scan_step.py); None at TP = 1
    leave: Callable | None = None


@functools.lru_cache(maxsize=4)
def _compiled(fn, fullgraph: bool):
    # fullgraph where there are no collectives: a graph break would be a silent slow path, and
    # past the shape budget it raises instead of running eagerly.
    return torch.compile(fn, dynamic=False, fullgraph=fullgraph)


def _step_functions(device: torch.device, spec: ScanSpec):
    if device.type != "cuda":
        return step_forward, step_backward
    fullgraph = spec.enter is None
    return _compiled(step_forward, fullgraph), _compiled(step_backward, fullgraph)


def _gemm_dtype(weights, dtype):
    """Matrices in the GEMM dtype (one cast per layer and pass, not per block); norms as they are."""
    n1w, qkv, proj, n2w, fc1, fc2 = weights
    return n1w, qkv.to(dtype), proj.to(dtype), n2w, fc1.to(dtype), fc2.to(dtype)


def _scales(fam: torch.Tensor, from_prompt: bool):
    """The residual factor of the first update (0 from the prompt, paper B.1) and of the others."""
    one = torch.ones((), device=fam.device)
    return (torch.zeros((), device=fam.device) if from_prompt else one), one


class FAMScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: ScanSpec, fam0, k, v, cos_q, sin_q, cos_k, sin_k, *weights):
        """fam0 [F, b, h]; k, v [S, b, g, d]; RoPE tables [T, F, b, 1, d] (FAM queries at each
        block's last F positions, FAM keys at the F before it); weights: norm1, qkv, proj, norm2,
        fc1, fc2. Returns F_T [F, b, h], FAM K, V [R, b, g, d] and, from the prompt, the
        prompt stream's output [F, b, h]."""
        forward_step, _ = _step_functions(k.device, spec)
        C, S, T, F = spec.block_size, k.shape[0], cos_q.shape[0], cos_q.shape[1]
        w = _gemm_dtype(weights, spec.dtype)
        first, rest = _scales(fam0, spec.from_prompt)
        fam_k = k.new_zeros(spec.fam_rows, *k.shape[1:])  # padding rows stay zero (masked keys)
        fam_v = v.new_zeros(spec.fam_rows, *v.shape[1:])
        fam, inputs = fam0.contiguous(), []
        config = (spec.eps, spec.groups, spec.head_dim, spec.dtype, spec.enter, spec.leave)
        with torch.autocast(k.device.type, enabled=False), bounded_compiles("the FAM scan (model/fast_scan.py)"):
            for t in range(T):
                lo, hi = t * C, min(S, (t + 1) * C)
                step = forward_step if hi - lo == C else step_forward
                inputs.append(fam)
                fam = step(fam, k[lo:hi], v[lo:hi], cos_q[t], sin_q[t], cos_k[t], sin_k[t], first if t == 0 else rest,
                           w, *config, fam_k[t * F : (t + 1) * F], fam_v[t * F : (t + 1) * F])
            prompt_out = ()
            if spec.from_prompt:  # the prompt rows at the F positions before the first block
                prompt_out = (forward_step(inputs[0], None, None, cos_k[0], sin_k[0], cos_k[0], sin_k[0], rest, w,
                                           *config),)
        ctx.spec = spec
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(torch.stack(inputs), k, v, cos_q, sin_q, cos_k, sin_k, *weights)
        return (fam, fam_k, fam_v) + prompt_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_fam, d_fam_k, d_fam_v, *d_prompt_out):
        spec = ctx.spec
        inputs, k, v, cos_q, sin_q, cos_k, sin_k, *weights = ctx.saved_tensors
        _, backward_step = _step_functions(k.device, spec)
        C, S, T, F = spec.block_size, k.shape[0], cos_q.shape[0], cos_q.shape[1]
        w = _gemm_dtype(weights, spec.dtype)
        first, rest = _scales(inputs, spec.from_prompt)
        d_k, d_v = torch.empty_like(k), torch.empty_like(v)
        pairs, norms = [], []
        config = (spec.eps, spec.groups, spec.head_dim, spec.dtype, spec.enter, spec.leave)
        d = d_fam
        with torch.autocast(k.device.type, enabled=False), bounded_compiles("the FAM scan (model/fast_scan.py)"):
            for t in reversed(range(T)):
                lo, hi = t * C, min(S, (t + 1) * C)
                step = backward_step if hi - lo == C else step_backward
                d, step_pairs, step_norms = step(
                    inputs[t], k[lo:hi], v[lo:hi], cos_q[t], sin_q[t], cos_k[t], sin_k[t], first if t == 0 else rest,
                    w, *config, d, d_fam_k[t * F : (t + 1) * F], d_fam_v[t * F : (t + 1) * F], d_k[lo:hi], d_v[lo:hi])
                pairs.append(step_pairs)
                norms.append(step_norms)
            if spec.from_prompt:
                d_prompt, step_pairs, step_norms = backward_step(
                    inputs[0], None, None, cos_k[0], sin_k[0], cos_k[0], sin_k[0], rest, w, *config, d_prompt_out[0])
                d = d + d_prompt
                pairs.append(step_pairs)
                norms.append(step_norms)
        grads = _weight_gradients(pairs, norms, weights)
        return (None, d.to(inputs.dtype), d_k, d_v, None, None, None, None, *grads)


def _weight_gradients(pairs, norms, weights):
    """One GEMM per weight over all steps' rows: dW = sum_t dY_t^T X_t = cat(dY)^T cat(X)."""
    n1w, qkv, proj, n2w, fc1, fc2 = weights
    matrices = []
    for i, weight in enumerate((qkv, proj, fc1, fc2)):
        x = torch.cat([p[i][0] for p in pairs]).flatten(0, -2)  # [T*F*b, in]
        dy = torch.cat([p[i][1] for p in pairs]).flatten(0, -2)  # [T*F*b, out]
        matrices.append((dy.t() @ x).to(weight.dtype))
    d_n1 = torch.stack([n[0] for n in norms]).sum(0).to(n1w.dtype)
    d_n2 = torch.stack([n[1] for n in norms]).sum(0).to(n2w.dtype)
    d_qkv, d_proj, d_fc1, d_fc2 = matrices
    return d_n1, d_qkv, d_proj, d_n2, d_fc1, d_fc2


def fast_scan(spec: ScanSpec, fam0, k, v, rope, weights):
    """(F_T, FAM K [R, b, g, d], FAM V, prompt stream output or None); see FAMScan.forward."""
    out = FAMScan.apply(spec, fam0, k, v, *rope, *weights)
    return out[0], out[1], out[2], (out[3] if spec.from_prompt else None)
