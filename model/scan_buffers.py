"""The fast FAM scan's buffers (model/fast_scan.py): what its loops read and write, per call.

The loops run over one dict of buffers, fresh for each call or (GPU) static ones that CUDA graphs
replay over (model/scan_graphs.py): the block keys/values in [T, F + C, b, g, d] (each block's FAM
rows then its tokens, model/scan_step.py), the key bias of a partial last block, the residual
scales, the RoPE tables, the steps' kept activations and the backward's output gradients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F_

from model.compile_limits import bounded_compiles, compiled_pointwise
from model.scan_step import Activations, Gradients


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

    def config(self) -> tuple:
        return self.eps, self.groups, self.head_dim, self.dtype, self.enter, self.leave


def gemm_dtype(weights, dtype):
    """Matrices in the GEMM dtype (one cast per layer and pass, not per block); norms as they are."""
    n1w, qkv, proj, n2w, fc1, fc2 = weights
    return n1w, qkv.to(dtype), proj.to(dtype), n2w, fc1.to(dtype), fc2.to(dtype)


def key_bias(T: int, F: int, C: int, S: int, device) -> torch.Tensor:
    """[T, F + C] fp32: 0 for visible keys, -inf for the padding of a partial last block."""
    bias = torch.zeros(T, F + C, device=device)
    bias[-1, F + S - (T - 1) * C :].fill_(float("-inf"))  # fill_, not `= value`: see scales
    return bias


def scales(device, from_prompt: bool) -> torch.Tensor:
    """The residual factor of the first update (0 from the prompt, paper B.1) and of the others.
    Filled on the device. `torch.tensor(list, device=...)` and `scales[0] = 0.0` both copy from
    pageable host memory, which waits for the GPU to catch up: on an H200 (2026-11-30) the item
    assignment made every fam-1b step wait for the GPU 36 times at 8k tokens (54 at 64k, with
    recompute), where the GPU was busy 78 % of the step (benchmarks/results/2026-11-30-2xH200,
    "Session 10"). fill_ passes the value as a kernel argument."""
    scales = torch.ones(2, device=device)
    if from_prompt:
        scales[:1].fill_(0.0)
    return scales


def fill_blocks(keys, values, k, v, fam_k, fam_v, F: int) -> None:
    """keys, values [T, F + C, b, g, d] get, per block t, F rows (fam_k's / fam_v's rows t*F:(t+1)*F;
    zeros for None, where the steps write them) then block t's rows of k, v [S, b, g, d], zero past S
    (never NaN garbage: masked keys still meet p = 0 in p @ V). One whole-buffer write per buffer:
    compiled on CUDA, keys and values in one kernel at the copy's bandwidth, where copying the blocks
    into the strided rows F: ran a generic strided copy at about a third of it (fam-1b, 8k,
    micro-batch 4, H200: 12.3 ms per step for 163 copies, "Session 13")."""
    for buffer, x, head in ((keys, k, fam_k), (values, v, fam_v)):
        T, C, rest = buffer.shape[0], buffer.shape[1] - F, x.shape[1:]
        x = F_.pad(x, (0, 0) * len(rest) + (0, T * C - x.shape[0])).view(T, C, *rest)
        head = x.new_zeros(T, F, *rest) if head is None else head[: T * F].view(T, F, *rest)
        buffer.copy_(torch.cat([head, x], dim=1))


def load_blocks(b: dict, k, v, fam_k=None, fam_v=None) -> None:
    """The block K/V (and, in the backward, the FAM K/V) into the loop's keys/values buffers. On CUDA
    compiled like the pointwise ops (model/compile_limits.py `Pointwise`: static for the first
    lengths, one dynamic graph past them), so evaluation across many lengths never meets the
    compile limit for what is only a copy."""
    args = (b["keys"], b["values"], k, v, fam_k, fam_v, b["rope"][0].shape[1])
    if not k.is_cuda:
        return fill_blocks(*args)
    with bounded_compiles("the FAM scan's block loads (model/scan_buffers.py)"):
        compiled_pointwise(fill_blocks)(*args)


def copy_into(buffers: dict, values: dict) -> None:
    for name, value in values.items():
        if isinstance(value, tuple):
            for dst, src in zip(buffers[name], value):
                dst.copy_(src)
        else:
            buffers[name].copy_(value)


def new_group(cls, steps: int, shapes: dict, device) -> tuple:
    return cls(**{name: torch.empty(steps, *shape, dtype=dtype, device=device) for name, (shape, dtype) in
                  shapes.items()})


def input_buffers(spec: ScanSpec, fam0, k, rope, weights, in_place: bool) -> dict:
    """Static copies of every input the loops read (weights in the GEMM dtype, norms as they are,
    unless the loops read them in place)."""
    T, F = rope[0].shape[0], rope[0].shape[1]
    new = functools.partial(torch.empty, device=k.device)
    buffers = dict(fam0=new(fam0.shape, dtype=fam0.dtype), rope=tuple(new(x.shape, dtype=x.dtype) for x in rope),
                   scales=new(2), bias=new(T, F + spec.block_size))
    if not in_place:
        buffers["weights"] = tuple(new(x.shape, dtype=x.dtype if i in (0, 3) else spec.dtype)
                                   for i, x in enumerate(weights))
    return buffers


class Blocks(NamedTuple):
    """A call's keys/values buffers, held for its backward (model/fast_scan.py `_take_blocks`)."""

    keys: torch.Tensor
    values: torch.Tensor


def block_buffers(spec: ScanSpec, k, rope) -> dict:
    """keys, values [T, F + C, b, g, d]: each block's FAM rows then its tokens (model/scan_step.py)."""
    T, F = rope[0].shape[0], rope[0].shape[1]
    return {name: k.new_empty(T, F + spec.block_size, *k.shape[1:]) for name in ("keys", "values")}


def kept_buffers(spec: ScanSpec, fam0, k, rope, weights) -> Activations:
    """New buffers for the steps' kept activations, one row per step (and the prompt step's last)."""
    T, F, b = rope[0].shape[0], rope[0].shape[1], k.shape[1]
    n1w, qkv, proj, n2w, fc1, fc2 = weights
    heads_q = qkv.shape[0] // (spec.groups * spec.head_dim) - 2  # per group
    gemm = lambda features: ((F, b, features), spec.dtype)  # noqa: E731 - all F rows (gathered under SP)
    shapes = dict(fam=(fam0.shape, fam0.dtype), q=((b, spec.groups, heads_q * F, spec.head_dim), k.dtype),
                  a=(fam0.shape, torch.float32), gate_up=gemm(fc1.shape[0]), x_qkv=gemm(qkv.shape[1]),
                  x_proj=((b, F, proj.shape[1]), spec.dtype), x_fc1=gemm(fc1.shape[1]), x_fc2=gemm(fc2.shape[1]),
                  lse=((b, spec.groups, heads_q * F), torch.float32))
    return new_group(Activations, T + spec.from_prompt, shapes, k.device)


def forward_outputs(spec: ScanSpec, fam0, k, rope, weights) -> dict:
    """New buffers the forward loop writes: the per-block keys/values and the kept activations."""
    F, kv = rope[0].shape[1], k.shape[1:]
    out = dict(block_buffers(spec, k, rope), saved=kept_buffers(spec, fam0, k, rope, weights))
    if spec.from_prompt:
        out.update(prompt_keys=k.new_empty(F, *kv), prompt_values=k.new_empty(F, *kv))
    return out


def backward_outputs(spec: ScanSpec, k, rope, weights) -> dict:
    """New buffers the backward loop writes: the weight uses' output gradients, the block K/V's."""
    T, F, C = rope[0].shape[0], rope[0].shape[1], spec.block_size
    b, kv = k.shape[1], k.shape[1:]
    n1w, qkv, proj, n2w, fc1, fc2 = weights
    gemm = lambda w: ((F, b, w.shape[0]), spec.dtype)  # noqa: E731
    shapes = dict(d_qkv=gemm(qkv), d_proj=((b, F, proj.shape[0]), spec.dtype), d_fc1=gemm(fc1), d_fc2=gemm(fc2),
                  d_norm1=(n1w.shape, torch.float32), d_norm2=(n2w.shape, torch.float32))
    # The block K/V gradients per block, [C, b, g, d]: the layout flash attention's backward writes them in
    # (its dk, dv are laid out like the keys and values it reads: [F + C, b, g, d]), so a step copies one
    # contiguous run of rows, and the gradient of k, v [S, b, g, d] adds them without a transpose.
    return dict(grads=new_group(Gradients, T + spec.from_prompt, shapes, k.device),
                d_keys=k.new_empty(T, C, *kv), d_values=k.new_empty(T, C, *kv))


def _join_blocks(keys, values, k, v, F: int, R: int):
    T, rest = keys.shape[0], keys.shape[2:]
    return tuple(torch.cat([buffer[:, :F].reshape(T * F, *rest), x.new_zeros(R - T * F, *rest), x])
                 for buffer, x in ((keys, k), (values, v)))


def join_blocks(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, F: int, R: int) -> tuple:
    """The block attention's keys and values [R + S, b, g, d] (model/masks.py): each block's F FAM rows
    (rows :F of the buffers [T, F + C, b, g, d]), zeros up to R, then the tokens' k or v [S, b, g, d].
    Compiled on CUDA like `load_blocks`, keys and values in one call: one kernel and one compiled call a
    layer, not two (the forward's launches are the CPU's: at fam-1b 8k, micro-batch 4, an H200's profile
    showed the GPU waiting on them at every layer, session 23)."""
    if not k.is_cuda:
        return _join_blocks(keys, values, k, v, F, R)
    with bounded_compiles("the FAM scan's keys and values (model/scan_buffers.py)"):
        return compiled_pointwise(_join_blocks)(keys, values, k, v, F, R)


def join(fam_rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[R + S, b, g, d] from the FAM rows [R, b, g, d] and x [S, b, g, d] (a recompute's stashed rows)."""
    return torch.cat([fam_rows, x])


def _add_block_rows(d_k, d_v, buffer_k, buffer_v):
    return tuple(outer + buffer.flatten(0, 1)[: outer.shape[0]] for outer, buffer in ((d_k, buffer_k), (d_v, buffer_v)))


def add_block_rows(d_k: torch.Tensor, d_v: torch.Tensor, buffer_k: torch.Tensor, buffer_v: torch.Tensor) -> tuple:
    """d_k, d_v [S, b, g, d] plus the blocks' rows of buffer_k, buffer_v [T, C, b, g, d] (C * T >= S), new
    tensors: the gradients of k and v from the block attention and from the scan, added where autograd would
    have added the scan's copy of its static buffer. Keys and values in one compiled call, as `join_blocks`."""
    if not d_k.is_cuda:
        return _add_block_rows(d_k, d_v, buffer_k, buffer_v)
    with bounded_compiles("the FAM scan's K/V gradients (model/scan_buffers.py)"):
        return compiled_pointwise(_add_block_rows)(d_k, d_v, buffer_k, buffer_v)
