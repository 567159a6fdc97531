"""The block-attention mask of the layer-major FAM execution, as one index function.

Keys are laid out as [memory from the previous call (M rows); FAM keys (T*F rows: F_{t-1}
for each block t); block tokens (T*C rows)], queries are the T*C block tokens
(fam-paper.md §6.1, block rows):
    memory/earlier-block key -> visible iff its block is among the query block's m previous;
    FAM key of block t       -> visible iff t is the query's block;
    token key in own block   -> visible iff causal.
The same function builds a dense boolean mask (SDPA, CPU) and a FlexAttention block mask (GPU),
so both paths share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    mem_len: int  # M, a multiple of block_size
    num_blocks: int  # T
    block_size: int  # C
    fam_len: int  # F
    mem_blocks: int  # m

    @property
    def kv_len(self) -> int:
        return self.mem_len + self.num_blocks * (self.fam_len + self.block_size)

    @property
    def q_len(self) -> int:
        return self.num_blocks * self.block_size

    def mask_mod(self):
        M, T, C, F, m = self.mem_len, self.num_blocks, self.block_size, self.fam_len, self.mem_blocks
        token_start = M + T * F

        def visible(b, h, q_idx, kv_idx):
            q_block = q_idx // C
            is_token = kv_idx >= token_start
            is_fam = (kv_idx >= M) & ~is_token
            is_mem = kv_idx < M
            # Earlier blocks: from the previous call's memory (negative block index) or this call.
            mem_block = (kv_idx - M).div(C, rounding_mode="floor")
            tok = kv_idx - token_start
            tok_block = tok.div(C, rounding_mode="floor")
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
