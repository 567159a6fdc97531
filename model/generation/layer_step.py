"""One layer's decode math, built from the layer's own modules (model/layer.py, model/scan.py).

For n new tokens of the current block (n = 1 when decoding), at layer l:
    q, k, v  = attention.project_qkv(input_norm(x))      RoPE at the tokens' absolute positions
    context  = Attn(q, [memory; FAM keys; block so far + new])   causal among the new tokens
    x        = ffn(project_out(context) + x)
exactly the block rows of Algorithm 2 (docs/fam.md, "The algorithm"). When the block completes, the FAM
update runs on it: the layer's `fam_update` (model/scan.py's `fam_step` with the layer's own
weights and RoPE tables: FAM queries at the block's last F positions over [F_{t-1} keys; the
whole block]), the same math as the layer-major forward's scan. The new FAM's K/V as keys sit at the F positions
before the next block (§1.5), i.e. the block's last F positions.
Shapes: hidden [n, b, h], positions [b, n] float, K/V [rows, b, g, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_

from model.generation.cache import LayerCache


def block_rows(layer, cache: LayerCache, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """New tokens x [n, b, h] at positions [b, n] through the layer; their K/V join the cache."""
    att = layer.attention
    q, k, v = att.project_qkv(layer.input_norm(x), positions, positions)
    cache.append(k, v)
    keys, values = cache.visible()
    return layer.ffn(att.project_out(attend_newest(q, keys, values)) + x)


def attend_newest(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, b, heads, d], the newest n of keys k, v [L, b, g, d] -> context [n, b, heads*d].
    Every key is visible except the new tokens after the query (causal, aligned to the end)."""
    n, b, L = q.shape[0], q.shape[1], k.shape[0]
    mask = None
    if n > 1:
        rows = torch.arange(L - n, L, device=q.device)[:, None]
        mask = torch.arange(L, device=q.device)[None, :] <= rows  # [n, L]
    out = F_.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.to(q.dtype).permute(1, 2, 0, 3), v.to(q.dtype).permute(1, 2, 0, 3),
        attn_mask=mask, enable_gqa=True,
    )  # [b, heads, n, d]
    return out.permute(2, 0, 1, 3).reshape(n, b, -1)


def fam_keys(layer, fam: torch.Tensor, first_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [F, b, g, d] of FAM rows fam [F, b, h] as keys at positions first_position .. +F-1."""
    n_f, b = fam.shape[0], fam.shape[1]
    positions = (first_position + torch.arange(n_f, dtype=torch.float32, device=fam.device)).expand(b, n_f)
    _, k, v = layer.attention.project_qkv(layer.input_norm(fam), positions, positions)
    return k, v


def close_block(layer, cache: LayerCache, block_start: int, zero_residual: bool) -> None:
    """The current block (C tokens from position block_start) is complete: F_t from F_{t-1} and
    the block, its K/V for the next block, and the block into memory. BSWA: memory only."""
    if cache.fam is None:
        cache.close_block()
        return
    block_k, block_v = cache.block()
    c, b = block_k.shape[0], block_k.shape[1]
    positions = (block_start + torch.arange(c, dtype=torch.float32, device=block_k.device)).expand(b, c)
    fam = layer.fam_update(cache.fam, block_k, block_v, positions, 0.0 if zero_residual else 1.0)
    cache.close_block()
    cache.set_fam(fam, *fam_keys(layer, fam, block_start + c - fam.shape[0]))


def prompt_stream(layer, prompt: torch.Tensor, first_position: int) -> torch.Tensor:
    """Layer l's initial FAM [F, b, h] -> layer l+1's (model/reference.py, 523c99c): the prompt rows
    attend only among themselves at the F positions before the first block, then the FFN; the
    layer-major forward's step over an empty block."""
    b = prompt.shape[1]
    anchor = torch.full((b, 1), float(first_position), device=prompt.device)
    return layer.prompt_update(prompt, anchor)
