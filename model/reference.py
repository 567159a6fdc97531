"""TransformerFAM reference: plain single-device PyTorch, Algorithm 2 block by block.

This is the oracle every fast or parallel version is tested against. It is written to be read
next to docs/fam.md, not to be fast: it loops over blocks, and inside each block over layers,
running the paper's fused pass over the rows [F_{t-1}; block t].

Per layer l and block t (arXiv 2404.09173 §2.2 Algorithm 2; docs/fam.md, "The algorithm"):
    rows        = [F_{t-1} (F rows); I_t (C rows)]
    Q, K, V     = QKV(PreNorm(rows))                       same weights for FAM and tokens
    block rows  attend [mem (K,V of the previous m blocks); F_{t-1}; I_t causal]
    FAM rows    attend [F_{t-1} (full); I_t (the whole block)], never the memory blocks
    A           = Attn(...) + residual       residual: I_t for tokens, F_{t-1} for FAM
    O, F_t      = FF(PreNorm(A)) + A         the FAM goes through the same FFN
F_t of layer l feeds layer l at block t+1 (same-layer feedback, §6.3).

Initial FAM (the paper's appendix B.1 leaves it open; famtron's reading, docs/fam.md "Initial FAM"):
    a learned F x d prompt is prepended at the embedding level and flows up the stack as its own
    stream: at layer l the prompt rows attend only among themselves (full attention, "full
    attention is applied between the FAM prompt activations") and go through the layer's FFN;
    the result is layer l+1's initial FAM. So layer l's initial FAM depends on the weights alone,
    never on a token. (Reading (ii), layer l-1's FAM after it compressed block 1, would let every
    token of block 1 at layer l see later tokens of block 1 through that FAM: not causal.)
    The first FAM update uses a zero residual (paper B.1), since the initial FAM carries no context.
    A caller may instead pass an initial state (streaming, or random state passing, §1.6): then
    every layer starts from its own given FAM and the residual is that FAM.

Positions (RoPE, §1.5): block tokens use absolute positions (+ an optional offset, RPO).
    The FAM F_t as keys takes the last F positions of block t: the F positions just before
    block t+1 starts (for the initial FAM: the F positions before the first block, where the
    prompt stream's queries and keys both sit).
    The FAM queries that compress block t take the last F positions of block t, so block
    queries never see a key with a larger position. The price of that choice: a FAM query
    reading one of the last F-1 tokens of its own block sees a relative offset down to -(F-1).

F = 0 is exactly block sliding-window attention (BSWA); m = 0 and F = 0 is causal attention
inside each block. Any sequence length works: the last block may be partial.

Weights (`ReferenceFAM`): embed [V, h], fam_prompt [F, h]; per layer attn_norm [h],
wq [n*d, h], wk [g*d, h], wv [g*d, h], wo [h, n*d], mlp_norm [h], w_gate [ff, h],
w_up [ff, h], w_down [h, ff]; final_norm [h], lm_head [V, h]. model/weights.py maps them to
the megatron model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F_

from model.config import ModelArgs
from model.rope import apply_rope, rope_angles


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@dataclass
class ReferenceState:
    """What crosses blocks (§6): per layer, the last FAM and the K/V of the last m blocks."""

    fam: list[torch.Tensor | None]  # per layer [b, F, h]
    mem: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # per layer, per block (k, v) [b, g, C, d]
    position: int = 0


class ReferenceLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, n, g, d, ff = args.hidden_size, args.num_attention_heads, args.query_groups, args.head_dim, args.ffn_size
        self.args = args
        self.attn_norm = nn.Parameter(torch.ones(h))
        self.wq = nn.Parameter(torch.randn(n * d, h) * args.init_method_std)
        self.wk = nn.Parameter(torch.randn(g * d, h) * args.init_method_std)
        self.wv = nn.Parameter(torch.randn(g * d, h) * args.init_method_std)
        self.wo = nn.Parameter(torch.randn(h, n * d) * args.init_method_std)
        self.mlp_norm = nn.Parameter(torch.ones(h))
        self.w_gate = nn.Parameter(torch.randn(ff, h) * args.init_method_std)
        self.w_up = nn.Parameter(torch.randn(ff, h) * args.init_method_std)
        self.w_down = nn.Parameter(torch.randn(h, ff) * args.init_method_std)

    def heads(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return (x @ w.t()).view(b, s, -1, self.args.head_dim).transpose(1, 2)  # [b, heads, s, d]

    def ffn(self, a: torch.Tensor) -> torch.Tensor:
        x = rms_norm(a, self.mlp_norm, self.args.norm_epsilon)
        return (F_.silu(x @ self.w_gate.t()) * (x @ self.w_up.t())) @ self.w_down.t() + a

    def prompt_forward(self, prompt: torch.Tensor, first_pos: torch.Tensor) -> torch.Tensor:
        """The soft-prompt stream through this layer: prompt [b, F, h] attends to itself only
        (full attention) at the F positions before the first block (first_pos [b, 1]), then the
        FFN. The output is the next layer's initial FAM."""
        a, nF = self.args, prompt.shape[1]
        x = rms_norm(prompt, self.attn_norm, a.norm_epsilon)
        q, k, v = self.heads(x, self.wq), self.heads(x, self.wk), self.heads(x, self.wv)
        pos = first_pos - nF + torch.arange(nF, dtype=first_pos.dtype, device=first_pos.device)  # [b, F]
        cos, sin = rope_angles(pos, a.head_dim, a.rope_base)
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        out = F_.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.ffn(out.transpose(1, 2).reshape(prompt.shape[0], nF, -1) @ self.wo.t() + prompt)

    def forward(self, block, fam, mem, block_pos, zero_fam_residual):
        """One block through one layer: block [b, c, h], fam [b, F, h] (or None when F=0),
        mem: list of (k, v) of the previous <= m blocks, block_pos [b, c] float positions.
        Returns (block output [b, c, h], new FAM [b, F, h] or None, this block's (k, v))."""
        a, c, nF = self.args, block.shape[1], 0 if fam is None else fam.shape[1]
        rows = block if fam is None else torch.cat([fam, block], dim=1)
        x = rms_norm(rows, self.attn_norm, a.norm_epsilon)
        q, k, v = self.heads(x, self.wq), self.heads(x, self.wk), self.heads(x, self.wv)

        # Positions: FAM queries at the block's last F positions, FAM keys just before the block.
        start, end = block_pos[:, :1], block_pos[:, -1:] + 1
        offsets = torch.arange(nF, dtype=block_pos.dtype, device=block_pos.device)
        q_pos = torch.cat([end - nF + offsets, block_pos], dim=1)  # [b, F+c]
        k_pos = torch.cat([start - nF + offsets, block_pos], dim=1)
        cos_q, sin_q = rope_angles(q_pos, a.head_dim, a.rope_base)
        cos_k, sin_k = rope_angles(k_pos, a.head_dim, a.rope_base)
        q = apply_rope(q, cos_q[:, None], sin_q[:, None])
        k = apply_rope(k, cos_k[:, None], sin_k[:, None])
        block_kv = (k[:, :, nF:], v[:, :, nF:])

        mem_len = sum(mk.shape[2] for mk, _ in mem)
        keys = torch.cat([mk for mk, _ in mem] + [k], dim=2)
        values = torch.cat([mv for _, mv in mem] + [v], dim=2)

        # The mask of docs/fam.md, "The mask": rows [FAM; block], columns [mem; FAM; block].
        mask = torch.zeros(nF + c, mem_len + nF + c, dtype=torch.bool, device=block.device)
        mask[nF:, :mem_len] = True  # block queries see every memory block
        mask[:, mem_len : mem_len + nF] = True  # everyone sees the previous FAM (full attention)
        mask[nF:, mem_len + nF :] = torch.ones(c, c, dtype=torch.bool, device=block.device).tril()  # causal block
        mask[:nF, mem_len + nF :] = True  # FAM queries see the whole current block, not the memory

        out = F_.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(rows.shape[0], rows.shape[1], -1) @ self.wo.t()
        residual = rows if fam is None or not zero_fam_residual else torch.cat([torch.zeros_like(fam), block], dim=1)
        y = self.ffn(out + residual)
        new_fam = None if fam is None else y[:, :nF]
        return y[:, nF:], new_fam, block_kv


class ReferenceFAM(nn.Module):
    """TransformerFAM (or BSWA with F=0) language model; see the module docstring."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.attention != "fam":
            raise ValueError(f"model.attention={args.attention!r}: the reference implements 'fam' (and BSWA with F=0)")
        args.validate()
        self.args = args
        h = args.hidden_size
        self.embed = nn.Parameter(torch.randn(args.vocab_size, h) * args.init_method_std)
        self.fam_prompt = nn.Parameter(torch.randn(args.fam_len, h) * args.init_method_std) if args.fam_len else None
        self.layers = nn.ModuleList(ReferenceLayer(args) for _ in range(args.num_layers))
        self.final_norm = nn.Parameter(torch.ones(h))
        self.lm_head = nn.Parameter(torch.randn(args.vocab_size, h) * args.init_method_std)

    def forward(self, tokens: torch.Tensor, state: ReferenceState | None = None, position_offset=0.0):
        """tokens [b, s] -> (logits [b, s, V], final ReferenceState)."""
        a, (b, s) = self.args, tokens.shape
        start = 0 if state is None else state.position
        offset = torch.as_tensor(position_offset, dtype=torch.float64).reshape(-1, 1).expand(b, 1)
        positions = offset + start + torch.arange(s, dtype=torch.float64)  # [b, s]
        fam = [None] * a.num_layers if state is None else [None if f is None else f.expand(b, -1, -1) for f in state.fam]
        mem = [[] for _ in range(a.num_layers)] if state is None or not state.mem else [list(m) for m in state.mem]

        logits = []
        for t0 in range(0, s, a.block_size):
            x = self.embed[tokens[:, t0 : t0 + a.block_size]]
            first = state is None and t0 == 0
            prompt = None if self.fam_prompt is None or not first else self.fam_prompt.expand(b, -1, -1)
            for l, layer in enumerate(self.layers):
                block_pos = positions[:, t0 : t0 + x.shape[1]]
                fam_in = prompt if first else fam[l]  # the soft-prompt stream gives the first block's FAM
                if prompt is not None:
                    prompt = layer.prompt_forward(prompt, block_pos[:, :1])
                x, fam[l], kv = layer(x, fam_in, mem[l][-a.mem_blocks :] if a.mem_blocks else [], block_pos, first)
                mem[l] = (mem[l] + [kv])[-a.mem_blocks :] if a.mem_blocks else []
            logits.append(rms_norm(x, self.final_norm, a.norm_epsilon) @ self.lm_head.t())
        return torch.cat(logits, dim=1), ReferenceState(fam=fam, mem=mem, position=start + s)
