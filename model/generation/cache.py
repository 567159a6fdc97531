"""The decode state: per layer, one preallocated key/value window, plus the FAM it reads.

Per layer (docs/fam.md, "The algorithm": nothing else crosses blocks), rows [rows, b, g, d]:

    [ memory: the last m blocks' K/V (m*C rows) | FAM keys: K/V of F_{t-1} (F rows) | current block (C rows) ]

and F_{t-1} itself [F, b, h]. The current block's queries attend to one contiguous slice of
that window: the memory is right-aligned against the FAM rows, so while fewer than m blocks
have passed the slice simply starts later (no mask for one new token). For FAM and BSWA the
window is allocated once and never grows: memory is O(m*C + F + C) per layer whatever the
number of generated tokens. When a block completes it is copied into the memory rows
(dropping the oldest) and the FAM rows take the K/V of the updated FAM.

Dense attention (model.attention='dense') has no blocks, memory or FAM: its window is a plain
KV cache of every token so far, whose capacity doubles when full; O(sequence) memory, as full
attention needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    k: torch.Tensor  # [mem_rows + fam_rows + block capacity, b, g, d], post-RoPE keys
    v: torch.Tensor
    mem_rows: int  # m * C: the memory's capacity
    fam_rows: int  # F
    growable: bool  # dense: the block region (every token so far) grows; FAM/BSWA: fixed at C
    mem_len: int = 0  # memory rows in use, right-aligned against the FAM rows
    filled: int = 0  # tokens of the current block written so far
    fam: torch.Tensor | None = None  # F_{t-1} [F, b, h], the FAM the current block reads

    @classmethod
    def allocate(cls, mem_rows: int, fam_rows: int, block_rows: int, growable: bool,
                 like: torch.Tensor) -> "LayerCache":
        """An empty window; `like` [., b, g, d] gives batch, groups, head_dim, dtype, device."""
        shape = (mem_rows + fam_rows + block_rows, *like.shape[1:])
        return cls(like.new_zeros(shape), like.new_zeros(shape), mem_rows, fam_rows, growable)

    @property
    def block_start_row(self) -> int:
        return self.mem_rows + self.fam_rows

    def visible(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys/values the current block's queries see: [memory; FAM; block so far]."""
        lo, hi = self.mem_rows - self.mem_len, self.block_start_row + self.filled
        return self.k[lo:hi], self.v[lo:hi]

    def block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the current block's K/V [filled, b, g, d]."""
        lo, hi = self.block_start_row, self.block_start_row + self.filled
        return self.k[lo:hi], self.v[lo:hi]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new tokens' K/V [n, b, g, d] after the current block's."""
        lo, hi = self.block_start_row + self.filled, self.block_start_row + self.filled + k.shape[0]
        if hi > self.k.shape[0]:
            if not self.growable:
                raise RuntimeError(f"block overflow: {hi - self.block_start_row} tokens in a block of "
                                   f"{self.k.shape[0] - self.block_start_row} (the block should have been closed)")
            self._grow(hi)
        self.k[lo:hi] = k
        self.v[lo:hi] = v
        self.filled += k.shape[0]

    def load_memory(self, mem_k: torch.Tensor, mem_v: torch.Tensor) -> None:
        """Memory rows from a model forward's LayerState [M <= m*C, b, g, d]."""
        self.mem_len = mem_k.shape[0]
        self.k[self.mem_rows - self.mem_len : self.mem_rows] = mem_k
        self.v[self.mem_rows - self.mem_len : self.mem_rows] = mem_v

    def set_fam(self, fam: torch.Tensor, fam_k: torch.Tensor, fam_v: torch.Tensor) -> None:
        """The FAM the next block reads [F, b, h] and its K/V as keys [F, b, g, d]."""
        self.fam = fam
        self.k[self.mem_rows : self.block_start_row] = fam_k
        self.v[self.mem_rows : self.block_start_row] = fam_v

    def close_block(self) -> None:
        """The completed block joins the memory (the oldest block leaves); the block empties."""
        if self.mem_rows:
            block_k, block_v = self.block()
            # cat makes a copy, so the overlapping shift inside the window reads unchanged rows.
            self.k[: self.mem_rows] = torch.cat([self.k[: self.mem_rows], block_k])[-self.mem_rows :]
            self.v[: self.mem_rows] = torch.cat([self.v[: self.mem_rows], block_v])[-self.mem_rows :]
            self.mem_len = min(self.mem_len + self.filled, self.mem_rows)
        self.filled = 0

    def _grow(self, rows: int) -> None:
        capacity = max(rows, 2 * self.k.shape[0])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((capacity, *old.shape[1:]))
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this cache holds (any attribute, so nothing escapes a size check)."""
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor)]


@dataclass
class DecodeState:
    """Everything a decode step reads and writes, for a batch of sequences of equal length."""

    layers: list[LayerCache]
    position: int  # tokens consumed: the next token's position
    block_size: int | None  # C; None for dense attention (no blocks)
    first_update_pending: bool  # paper B.1: the next FAM update has a zero residual

    @property
    def block_filled(self) -> int:
        return self.layers[0].filled

    def nbytes(self) -> int:
        """Bytes of storage the state holds (whole storages, so a view cannot hide a larger buffer)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for c in self.layers for t in c.tensors()}
        return sum(s.nbytes() for s in storages.values())
