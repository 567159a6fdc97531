"""The FAM state that crosses calls: what a streaming run or random state passing carries.

Per layer (docs/fam.md, "The algorithm"): the last FAM F_t [F, b, h] and the keys/values of the last m
blocks' tokens [m*C, b, g, d] (post-RoPE, at their absolute positions). Plus the number of
tokens consumed, so positions continue. Under tensor parallelism each rank holds its own heads'
K/V; under pipeline parallelism each stage holds its own layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerState:
    fam: torch.Tensor | None  # [F, b or 1, h]; None when F = 0
    mem_k: torch.Tensor | None = None  # [M, b, g_local, d], M a multiple of the block size
    mem_v: torch.Tensor | None = None

    @property
    def mem_len(self) -> int:
        return 0 if self.mem_k is None else self.mem_k.shape[0]


@dataclass
class FAMState:
    layers: list[LayerState]
    position: int = 0  # tokens consumed so far; the next call's positions start here
    ends_mid_block: bool = False  # the last call ended in a partial block: not continuable

    def fam_only(self, index: int = 0) -> "FAMState":
        """Random state passing (docs/fam.md, "RPO and RSP"): the detached FAM of one batch element,
        shared by every element of the next step; no memory blocks, positions restart."""
        layers = [LayerState(None if s.fam is None else s.fam[:, index : index + 1].detach().clone()) for s in self.layers]
        return FAMState(layers=layers)

    def detach(self) -> "FAMState":
        def d(t):
            return None if t is None else t.detach()

        return FAMState([LayerState(d(s.fam), d(s.mem_k), d(s.mem_v)) for s in self.layers], self.position, self.ends_mid_block)

    def to_dict(self) -> dict:
        return {
            "position": self.position,
            "ends_mid_block": self.ends_mid_block,
            "layers": [{"fam": s.fam, "mem_k": s.mem_k, "mem_v": s.mem_v} for s in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FAMState":
        return cls([LayerState(**s) for s in d["layers"]], d["position"], d["ends_mid_block"])
