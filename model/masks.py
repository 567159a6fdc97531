"""The block-attention mask of the layer-major FAM execution, as one index function.

Keys are laid out as [memory from the previous call (M rows); FAM keys (R rows: F_{t-1} for
each block t in its F rows, then R - T*F never-visible padding rows); block tokens (S rows)],
queries are the S block tokens (docs/fam.md, "The mask", block rows):
    memory/earlier-block key -> visible iff its block is among the query block's m previous;
    FAM key of block t       -> visible iff t is the query's block;
    token key in own block   -> visible iff causal.
R is T*F rounded up to a multiple of FAM_ALIGN, FlexAttention's tile: then the token keys start
on a tile boundary, so a query tile pays for exactly one extra key tile (its block's FAM keys),
partly masked, and every token tile that is full in BSWA stays full (tests/test_scan.py counts
the tiles). With T*F unaligned (an odd T at F = 64) every token tile would straddle two blocks.
The same function builds a dense boolean mask (SDPA, CPU) and a FlexAttention block mask (GPU),
so both paths share one definition.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from model.compile_limits import bounded_compiles

FAM_ALIGN = 128  # FlexAttention's default key/value tile (BLOCK_SIZE)


def fam_key_rows(num_blocks: int, fam_len: int) -> int:
    """R: rows of the FAM key/value buffer for T blocks, tile-aligned."""
    return math.ceil(num_blocks * fam_len / FAM_ALIGN) * FAM_ALIGN


@dataclass(frozen=True)
class BlockLayout:
    mem_len: int  # M, a multiple of block_size
    seq_len: int  # S, the query tokens (the last block may be partial)
    block_size: int  # C
    fam_len: int  # F
    mem_blocks: int  # m

    @property
    def num_blocks(self) -> int:  # T
        return math.ceil(self.seq_len / self.block_size)

    @property
    def fam_rows(self) -> int:  # R
        return fam_key_rows(self.num_blocks, self.fam_len)

    @property
    def kv_len(self) -> int:
        return self.mem_len + self.fam_rows + self.seq_len

    @property
    def q_len(self) -> int:
        return self.seq_len

    def mask_mod(self):
        M, C, F, m = self.mem_len, self.block_size, self.fam_len, self.mem_blocks
        token_start = M + self.fam_rows

        def visible(b, h, q_idx, kv_idx):
            q_block = q_idx // C
            is_token = kv_idx >= token_start
            is_fam = (kv_idx >= M) & ~is_token
            is_mem = kv_idx < M
            # Earlier blocks: from the previous call's memory (negative block index) or this call.
            mem_block = (kv_idx - M).div(C, rounding_mode="floor")
            tok = kv_idx - token_start
            tok_block = tok.div(C, rounding_mode="floor")
            # Padding rows have a block index >= T, past every query's block: never visible.
            fam_block = (kv_idx - M).div(max(F, 1), rounding_mode="floor")
            back_mem = q_block - mem_block
            back_tok = q_block - tok_block
            see_mem = is_mem & (back_mem >= 1) & (back_mem <= m)
            see_fam = is_fam & (fam_block == q_block)
            see_tok = is_token & (((back_tok == 0) & (tok <= q_idx)) | ((back_tok >= 1) & (back_tok <= m)))
            return see_mem | see_fam | see_tok

        return visible

    def dense_mask(self, device) -> torch.Tensor:
        q = torch.arange(self.q_len, device=device)[:, None]
        kv = torch.arange(self.kv_len, device=device)[None, :]
        return self.mask_mod()(None, None, q, kv)  # [q_len, kv_len] bool


@functools.lru_cache(maxsize=1)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    # Compiled, the mask is evaluated block by block instead of materialising the whole
    # q_len x kv_len grid (tens of GiB at 64k tokens); bounded like the attention itself.
    return torch.compile(create_block_mask)


@functools.lru_cache(maxsize=32)
def flex_block_mask(layout, device: str):
    """FlexAttention's block mask of a layout (anything with mask_mod, q_len and kv_len), cached."""
    with bounded_compiles("create_block_mask (model/masks.py)"):
        return _compiled_create_block_mask()(layout.mask_mod(), None, None, layout.q_len, layout.kv_len, device=device)
