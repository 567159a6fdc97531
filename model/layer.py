"""The FAM transformer layer, layer-major (fam-paper.md §2.2: "almost the cost of BSWA").

Where the reference loops block by block, this layer processes a whole sequence at once:
  1. QKV of all block tokens in one GEMM;
  2. the sequential FAM scan: only the F FAM rows per block go through the recurrence
     (QKV, attention over [F_{t-1}; block t], projection, residual, norm, FFN);
  3. attention of all blocks at once over [memory blocks; F_{t-1}; causal block];
  4. projection and FFN of all block tokens, one GEMM each.
Input and output are one tensor [F + S, b, h]: the FAM rows, then the block tokens (with
sequence parallelism, this rank's [F/tp + S/tp, b, h]: both sharded along the token dimension;
megatron's SP linears gather before QKV and FC1 and reduce-scatter after the projections, and the
scan does the same to its F rows). The F rows are the soft-prompt stream of model/reference.py:
on the way in, this layer's initial FAM (the prompt at layer 0); on the way out, the same rows
after attending only among themselves and the FFN, the next layer's initial FAM. An optional
LayerState (streaming, random state passing) replaces the rows as the initial FAM; the rows
then pass through unchanged, since no layer reads them.
"""

from __future__ import annotations

import functools
import math

import torch
from megatron.core.parallel_state import get_tensor_model_parallel_group
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from model.attention import FAMSelfAttention
from model.config import FAMConfig
from model.masks import BlockLayout
from model.norm import build_norm
from model.rope import rope_angles
from model.scan import fam_step_for
from model.state import LayerState


class FAMLayer(MegatronModule):
    def __init__(self, config: FAMConfig, layer_number: int, tp_group=None):
        super().__init__(config)
        self.layer_number = layer_number
        self.tp_group = tp_group if tp_group is not None else get_tensor_model_parallel_group()
        sp = config.tensor_model_parallel_size if config.sequence_parallel else 1
        self.local_fam_rows = config.fam_len // sp  # FAM rows of the hidden tensor on this rank
        self.input_norm = build_norm(config)
        self.attention = FAMSelfAttention(config, tp_group=tp_group)
        self.pre_mlp_norm = build_norm(config)
        self.mlp = MLP(
            config,
            MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            tp_group=tp_group,
        )

    def ffn(self, a: torch.Tensor) -> torch.Tensor:
        """O = FF(PreNorm(A)) + A, for tokens and FAM alike (Algorithm 2)."""
        out, _ = self.mlp(self.pre_mlp_norm(a))
        return out + a

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, state: LayerState | None = None):
        """hidden [F + S, b, h], positions [b, S] float -> (hidden [F + S, b, h], LayerState)."""
        cfg = self.config
        if cfg.attention == "dense":
            return self._dense(hidden, positions, state)
        F, C = cfg.fam_len, cfg.block_size
        F_local = self.local_fam_rows
        x = hidden[F_local:]  # [S, b, h], or this rank's [S/tp, b, h] under sequence parallelism
        S, b = positions.shape[1], x.shape[1]
        T = math.ceil(S / C)
        q, k, v = self.attention.project_qkv(self.input_norm(x), positions, positions)  # 1: one GEMM

        fam_k, fam_v, fam, prompt_out = [], [], None, None
        if F:  # 2: the FAM scan (model/scan.py)
            prompt = hidden[:F_local]
            fam = state.fam.expand(-1, b, -1) if state is not None else prompt
            rope_q, rope_k = self._fam_rope(positions, S)
            step, weights = fam_step_for(x.device), self._scan_weights()
            # The soft-prompt stream: the prompt rows attend only among themselves, at the F
            # positions before the first block (a step over an empty block).
            prompt_out = prompt if state is not None else step(prompt, k[:0], v[:0], *rope_k[0], *rope_k[0], 1.0, *weights)[0]
            for t in range(T):
                lo, hi = t * C, min((t + 1) * C, S)
                zero_residual = t == 0 and state is None  # paper B.1: the first update has none
                fam, fk, fv = step(
                    fam, k[lo:hi], v[lo:hi], *rope_q[t], *rope_k[t], 0.0 if zero_residual else 1.0,
                    *weights,
                )
                fam_k.append(fk)
                fam_v.append(fv)

        # 3: all blocks at once. Pad to whole blocks; padded keys sit after every real query.
        pad = T * C - S
        mem_k, mem_v = (state.mem_k, state.mem_v) if state is not None and state.mem_len else (None, None)
        keys = [t for t in (mem_k, *fam_k, _pad(k, pad)) if t is not None]
        values = [t for t in (mem_v, *fam_v, _pad(v, pad)) if t is not None]
        layout = BlockLayout(0 if mem_k is None else mem_k.shape[0], T, C, F, cfg.mem_blocks)
        context = self.attention.attend_blocks(_pad(q, pad), torch.cat(keys), torch.cat(values), layout)[:S]
        x = self.ffn(self.attention.project_out(context) + x)  # 4

        new_state = LayerState(fam, *self._memory(mem_k, mem_v, k, v))
        out = torch.cat([prompt_out, x]) if F else x
        return out, new_state

    def _fam_rope(self, positions: torch.Tensor, S: int):
        """cos/sin [T, F, b, 1, d] for every block's FAM queries (the block's last F positions)
        and FAM keys (the F positions before the block), computed once for the whole scan."""
        F, C = self.config.fam_len, self.config.block_size
        starts = positions[:, 0::C]  # [b, T]
        ends = positions[:, C - 1 :: C] + 1
        if ends.shape[1] < starts.shape[1]:  # a partial last block ends at the last token
            ends = torch.cat([ends, positions[:, -1:] + 1], dim=1)
        offsets = torch.arange(F, dtype=positions.dtype, device=positions.device) - F
        tables = []
        for anchor in (ends, starts):  # queries end at the block's end, keys before its start
            cos, sin = rope_angles(anchor[:, :, None] + offsets, self.config.kv_channels, self.config.rope_base)
            cos, sin = cos.permute(1, 2, 0, 3)[:, :, :, None], sin.permute(1, 2, 0, 3)[:, :, :, None]
            tables.append(list(zip(cos.unbind(0), sin.unbind(0))))  # per block: ([F, b, 1, d], same)
        return tables

    def _scan_weights(self):
        """The layer's own weights and TP mappings, in fam_step's argument order."""
        cfg, att = self.config, self.attention
        enter = leave = None
        if cfg.sequence_parallel:  # FAM rows sharded along F, like the tokens along S
            enter = functools.partial(gather_from_sequence_parallel_region, group=self.tp_group)
            leave = functools.partial(reduce_scatter_to_sequence_parallel_region, group=self.tp_group)
        elif cfg.tensor_model_parallel_size > 1:
            enter = functools.partial(copy_to_tensor_model_parallel_region, group=self.tp_group)
            leave = functools.partial(reduce_from_tensor_model_parallel_region, group=self.tp_group)
        matrices = [att.linear_qkv.weight, att.linear_proj.weight, self.mlp.linear_fc1.weight, self.mlp.linear_fc2.weight]
        if torch.is_autocast_enabled("cuda"):
            # Cast once per layer, not once per block: a compiled step would otherwise save its
            # own bf16 copy of every weight for backward, T copies per layer.
            dtype = torch.get_autocast_dtype("cuda")
            matrices = [w.to(dtype) for w in matrices]
        qkv, proj, fc1, fc2 = matrices
        return (
            self.input_norm.weight, qkv, proj, self.pre_mlp_norm.weight, fc1, fc2,
            cfg.layernorm_epsilon, att.groups, att.head_dim, enter, leave,
        )

    def _memory(self, mem_k, mem_v, k, v):
        """The K/V of the last m whole blocks, for the next call."""
        keep = self.config.mem_blocks * self.config.block_size
        if keep == 0:
            return None, None
        all_k = k if mem_k is None else torch.cat([mem_k, k])
        all_v = v if mem_v is None else torch.cat([mem_v, v])
        # Copies, not views: a view would keep the whole sequence's K/V (and QKV output) alive.
        return all_k[-keep:].clone(), all_v[-keep:].clone()

    def _dense(self, hidden, positions, state):
        if state is not None:
            raise ValueError("model.attention='dense' keeps no streaming state; pass state=None")
        q, k, v = self.attention.project_qkv(self.input_norm(hidden), positions, positions)
        x = self.ffn(self.attention.project_out(self.attention.attend_causal(q, k, v)) + hidden)
        return x, LayerState(None)


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    return x if pad == 0 else torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
