"""The block attention in two parts merged by log-sum-exp, so that the FAM scan runs beside the
larger part (issue 13).

model/attention.py's `attend_blocks` attends every block's queries over [memory; FAM keys; block]
in one FlexAttention call. That call needs the FAM keys, so the whole sequential scan must finish
first, and the GPU runs the scan's small kernels alone. Split by keys instead (block rows of
docs/fam.md, "The mask"):
  window: the memory blocks and the causal block: BSWA's own attention, which needs no FAM key;
  fam:    the block's F keys of F_{t-1} (a block-diagonal attention, F keys per block).
A softmax over disjoint key sets merges exactly:
  lse = logaddexp(lse_w, lse_f),   out = exp(lse_w - lse) * out_w + exp(lse_f - lse) * out_f.
model/layer.py launches the scan on a side stream, the window part on the main stream, and the
FAM part and the merge after both (model/streams.py). In backward the scan's node runs on its side
stream again (autograd runs a node on its forward's stream), beside the window part's backward.
Every query sees at least itself in the window and F > 0 keys in the FAM part, so no lse is -inf.

On GPU each part is one compiled FlexAttention call that returns its lse (gradients flow through
the lse: checked on an H200 against a dense logsumexp, benchmarks/results/2026-11-30-2xH200/
lse_probe.log); on CPU both are fp32 math with an explicit logsumexp, checked against
`attend_blocks` in tests/test_split_attention.py; tests/test_gpu.py checks the GPU path.

Measured (one H200, 2026-11-30, benchmarks/results/2026-11-30-2xH200, "Session 11"; fam-1b,
bf16-mixed, micro-batch 1): no gain, so model.overlap_fam_scan is off by default.
  8k:  37.2k tokens/s split, GPU busy 88 %, 193 ms of kernels; 39.1k one call, 91 %, 191 ms;
  32k: 44.2k split; 42.6k one call (an earlier session, before a sync fix that helped it too);
  64k: 35.5k split (a busy host); 36.1k one call.
The wall time did not drop below the one-call step's kernel time. A likely reason, not yet profiled:
a FlexAttention tile fills an SM's shared memory, so the scan's kernels get SMs only as the window
part's tiles retire, taking them from it (time-sliced, not overlapped); and at 8k the cross-stream
waits leave the GPU idle more often (88 % busy against 91 %).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from model.compile_limits import bounded_compiles, compiled_pointwise
from model.masks import BlockLayout, flex_block_mask


@dataclass(frozen=True)
class FamPartLayout:
    """Queries: the S block tokens; keys: the FAM rows [R] (block t's F_{t-1} in rows t*F..t*F+F,
    then never-visible padding, model/masks.py)."""

    seq_len: int
    block_size: int
    fam_len: int
    fam_rows: int

    @property
    def q_len(self) -> int:
        return self.seq_len

    @property
    def kv_len(self) -> int:
        return self.fam_rows

    def mask_mod(self):
        C, F = self.block_size, self.fam_len

        def visible(b, h, q_idx, kv_idx):  # padding rows have a block index >= T: never visible
            return kv_idx.div(F, rounding_mode="floor") == q_idx.div(C, rounding_mode="floor")

        return visible

    dense_mask = BlockLayout.dense_mask  # the same grid evaluation of mask_mod over q_len x kv_len


def parts(layout: BlockLayout) -> tuple[BlockLayout, FamPartLayout]:
    """The window part's layout (keys [memory; block tokens]: the same layout with F = 0) and the
    FAM part's."""
    window = BlockLayout(layout.mem_len, layout.seq_len, layout.block_size, 0, layout.mem_blocks)
    return window, FamPartLayout(layout.seq_len, layout.block_size, layout.fam_len, layout.fam_rows)


def _flex_lse(q, k, v, block_mask):
    from torch.nn.attention import flex_attention as flex

    if hasattr(flex, "AuxRequest"):  # torch >= 2.9; return_lse is deprecated there
        out, aux = flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True,
                                       return_aux=flex.AuxRequest(lse=True))
        return out, aux.lse
    return flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)


@functools.lru_cache(maxsize=1)
def _compiled_flex_lse():
    return torch.compile(_flex_lse, dynamic=False, fullgraph=True)  # as model/attention.py's _compiled_flex


def attend(q, k, v, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, n, S, d], k, v [b, g, K, d] under `layout`'s mask -> (out [b, n, S, d], lse [b, n, S] fp32)."""
    if q.is_cuda:
        block_mask = flex_block_mask(layout, str(q.device))
        with bounded_compiles("FlexAttention with lse (model/split_attention.py)"):
            return _compiled_flex_lse()(q, k.to(q.dtype), v.to(q.dtype), block_mask)
    n, g = q.shape[1], k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    k, v = (x.repeat_interleave(n // g, dim=1).to(dtype) for x in (k, v))
    scores = (q.to(dtype) @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~layout.dense_mask(q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v
    return out.to(q.dtype), lse


def _merge(out_w, lse_w, out_f, lse_f):
    lse = torch.logaddexp(lse_w, lse_f)[..., None]
    dtype = torch.promote_types(out_w.dtype, torch.float32)
    merged = torch.exp(lse_w[..., None] - lse) * out_w.to(dtype) + torch.exp(lse_f[..., None] - lse) * out_f.to(dtype)
    return merged.to(out_w.dtype)


def merge(out_w, lse_w, out_f, lse_f) -> torch.Tensor:
    """The attention over both key sets, [b, n, S, d]; one fused kernel on GPU."""
    if out_w.is_cuda:
        return compiled_pointwise(_merge)(out_w, lse_w, out_f, lse_f)
    return _merge(out_w, lse_w, out_f, lse_f)
