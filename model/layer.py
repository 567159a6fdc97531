"""The FAM transformer layer, layer-major (arXiv 2404.09173 §2.2: "almost the cost of BSWA").

Where the reference loops block by block, this layer processes a whole sequence at once:
  1. QKV of all block tokens in one GEMM;
  2. the sequential FAM scan: only the F FAM rows per block go through the recurrence
     (QKV, attention over [F_{t-1}; block t], projection, residual, norm, FFN): on GPU one
     autograd node for the whole scan (model/fast_scan.py), on CPU the per-step autograd scan
     (model/scan.py) that is its oracle;
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

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from model.attention import FAMSelfAttention
from model.config import FAMConfig
from model.fast_scan import fast_scan
from model.masks import BlockLayout
from model.mlp import FAMMLP
from model.norm import build_norm
from model.rope import SHARED, rope_angles
from model.scan import eager_scan, fam_step
from model.scan_buffers import ScanSpec
from model.state import LayerState
from model.streams import Beside


class FAMLayer(MegatronModule):
    def __init__(self, config: FAMConfig, layer_number: int, *, tp_group):
        super().__init__(config)
        self.layer_number = layer_number
        self.tp_group = tp_group  # every collective of this layer, the scan's included (model/groups.py)
        sp = config.tensor_model_parallel_size if config.sequence_parallel else 1
        self.local_fam_rows = config.fam_len // sp  # FAM rows of the hidden tensor on this rank
        self.use_fast_scan: bool | None = None  # None: the fast scan on GPU, the eager one on CPU
        self.split_attention: bool | None = None  # None: model.overlap_fam_scan on GPU (splits_attention)
        self.input_norm = build_norm(config, tp_group)
        self.attention = FAMSelfAttention(config, tp_group=tp_group)
        self.pre_mlp_norm = build_norm(config, tp_group)
        self.mlp = FAMMLP(
            config,
            MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            tp_group=tp_group,
        )

    def ffn(self, a: torch.Tensor) -> torch.Tensor:
        """O = FF(PreNorm(A)) + A, for tokens and FAM alike (Algorithm 2)."""
        return self.feed_forward(a) + a

    def feed_forward(self, a: torch.Tensor) -> torch.Tensor:
        """FF(PreNorm(A)): `ffn` without its residual."""
        out, _ = self.mlp(self.pre_mlp_norm(a))
        return out

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, state: LayerState | None = None):
        """hidden [F + S, b, h], positions [b, S] float -> (hidden [F + S, b, h], LayerState)."""
        cfg = self.config
        if cfg.attention == "dense":
            return self._dense(hidden, positions, state)
        F = cfg.fam_len
        # [S, b, h], or this rank's [S/tp, b, h] under sequence parallelism. One split, not two slices: its
        # backward writes the hidden gradient once (a cat), where two slices' backwards each filled a zero
        # [F + S, b, h] and autograd added them (fam-1b at 8k, micro-batch 4, H200: 2.4 ms of fills and adds).
        prompt, x = hidden.split([self.local_fam_rows, hidden.shape[0] - self.local_fam_rows]) if F else (None, hidden)
        S = positions.shape[1]
        q, k, v = self.attention.project_qkv(self.input_norm(x), positions, positions)  # 1: one GEMM
        mem_k, mem_v = (state.mem_k, state.mem_v) if state is not None and state.mem_len else (None, None)
        layout = BlockLayout(0 if mem_k is None else mem_k.shape[0], S, cfg.block_size, F, cfg.mem_blocks)

        fam, prompt_out, window = None, None, None
        keys, values = k, v  # the block attention's, past the memory: [R + S] with FAM (model/masks.py)
        split = F and self.splits_attention(x.device)
        beside = Beside(x.device) if split else None
        if F:  # 2: the FAM scan (model/scan.py, model/fast_scan.py), which returns keys, values [R + S]
            fam0 = prompt if state is None else state.fam.expand(-1, x.shape[1], -1)
            scan = fast_scan if self.uses_fast_scan(x.device) else eager_scan
            rope = self._fam_rope(positions)
            args = (self._scan_spec(state is None, layout.fam_rows), fam0, k, v, rope, self._scan_weights())
            if split:  # on a side stream, beside the window attention (model/split_attention.py)
                fam, keys, values, prompt_out = beside.run(scan, (fam0, k, v, *rope), *args)
                window = self.attention.attend_window(q, mem_k, mem_v, k, v, layout)
                beside.join((fam, keys, values, prompt_out))
            else:
                fam, keys, values, prompt_out = scan(*args)
            if prompt_out is None:  # a passed-in state replaces the prompt; no layer reads its rows
                prompt_out = prompt

        # 3: all blocks at once over [memory; FAM keys; tokens] (model/masks.py)
        if split:
            R = layout.fam_rows
            context = self.attention.attend_fam_and_merge(q, keys[:R], values[:R], window, layout)
        else:
            if mem_k is not None or not F:  # (the scan's are one tensor each already)
                keys = torch.cat([t for t in (mem_k, keys) if t is not None])
                values = torch.cat([t for t in (mem_v, values) if t is not None])
            context = self.attention.attend_blocks(q, keys, values, layout)
        a = self.attention.project_out(context) + x  # 4
        y = self.feed_forward(a)
        out = RowsAndResidual.apply(prompt_out, y, a) if F else y + a  # [F + S]: `ffn`'s sum written in place

        new_state = LayerState(fam, *self._memory(mem_k, mem_v, k, v))
        return out, new_state

    def uses_fast_scan(self, device: torch.device) -> bool:
        """The fast scan on GPU, the eager per-step scan (its oracle) on CPU, unless
        `use_fast_scan` says otherwise (tests run the fast path on CPU)."""
        return device.type == "cuda" if self.use_fast_scan is None else self.use_fast_scan

    def splits_attention(self, device: torch.device) -> bool:
        """The block attention split in a window and a FAM part, the scan beside the first
        (model/split_attention.py): with model.overlap_fam_scan (off by default: measured no faster)
        and the fast scan on GPU at TP = 1 (the scan's collectives stay on the main stream), unless
        `split_attention` says otherwise (tests run it on CPU, without a second stream)."""
        if self.split_attention is not None:
            return self.split_attention
        cfg = self.config
        return (cfg.overlap_fam_scan and device.type == "cuda" and self.uses_fast_scan(device)
                and cfg.tensor_model_parallel_size == 1)

    def _fam_rope(self, positions: torch.Tensor):
        """cos/sin [T, F, b, 1, d] for every block's FAM queries (the block's last F positions)
        and FAM keys (the F positions before the block), computed once for the whole scan and
        shared by every layer that gets the same positions (model/rope.py `SharedTables`)."""
        F, C, d, base = self.config.fam_len, self.config.block_size, self.config.kv_channels, self.config.rope_base
        return SHARED.get(positions, ("fam", F, C, d, base), lambda: _fam_tables(positions, F, C, d, base))

    def _scan_spec(self, from_prompt: bool, fam_rows: int) -> ScanSpec:
        cfg, att = self.config, self.attention
        dtype = self.attention.linear_qkv.weight.dtype
        if torch.is_autocast_enabled("cuda") and self.attention.linear_qkv.weight.is_cuda:
            dtype = torch.get_autocast_dtype("cuda")
        enter, leave = _scan_mappings(cfg.sequence_parallel, cfg.tensor_model_parallel_size, self.tp_group)
        return ScanSpec(cfg.block_size, from_prompt, fam_rows, cfg.layernorm_epsilon, att.groups, att.head_dim, dtype,
                        enter, leave)

    def _scan_weights(self):
        """The layer's own weights, in the scan's order (no new ones: Algorithm 2)."""
        att, mlp = self.attention, self.mlp
        return (self.input_norm.weight, att.linear_qkv.weight, att.linear_proj.weight, self.pre_mlp_norm.weight,
                mlp.linear_fc1.weight, mlp.linear_fc2.weight)

    def fam_update(self, fam, block_k, block_v, positions, residual_scale: float):
        """One FAM update outside the scan (streaming generation): F_t [F, b, h] from F_{t-1} and one
        block's K/V [c, b, g, d] at positions [b, c]; model/scan.py's `fam_step`, eagerly."""
        cos_q, sin_q, cos_k, sin_k = self._fam_rope(positions)
        spec = self._scan_spec(False, self.config.fam_len)
        return fam_step(fam, block_k, block_v, cos_q[0], sin_q[0], cos_k[0], sin_k[0], residual_scale,
                        *self._scan_weights(), spec.eps, spec.groups, spec.head_dim, spec.enter, spec.leave)[0]

    def prompt_update(self, prompt, first_position):
        """The soft-prompt stream through this layer outside the scan: the prompt rows [F, b, h]
        attend only among themselves at the F positions before the first block (first_position
        [b, 1]), then the FFN; a FAM step over an empty block."""
        _, _, cos_k, sin_k = self._fam_rope(first_position)
        att, spec = self.attention, self._scan_spec(True, self.config.fam_len)
        empty = prompt.new_zeros(0, prompt.shape[1], att.groups, att.head_dim)
        return fam_step(prompt, empty, empty, cos_k[0], sin_k[0], cos_k[0], sin_k[0], 1.0, *self._scan_weights(),
                        spec.eps, spec.groups, spec.head_dim, spec.enter, spec.leave)[0]

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


class RowsAndResidual(torch.autograd.Function):
    """[head; y + a]: the layer's output [F + S, b, h], the FFN's residual sum written straight into its
    rows F: (`FAMLayer.ffn`'s `out + a`, then a `cat` with the prompt stream's rows, copied the whole
    hidden tensor once more: fam-1b at 8k, micro-batch 4, H200, 18 copies of 101 MB, about 1 ms a step,
    session 22's trace). Its backward hands out views of the gradient, as the cat's and the add's did."""

    @staticmethod
    def forward(ctx, head, y, a):
        n = head.shape[0]
        out = y.new_empty(n + y.shape[0], *y.shape[1:], dtype=torch.promote_types(y.dtype, a.dtype))
        torch.add(y, a, out=out[n:])
        out[:n].copy_(head)
        ctx.rows = n
        return out

    @staticmethod
    def backward(ctx, d_out):
        return d_out[: ctx.rows], d_out[ctx.rows :], d_out[ctx.rows :]


def _fam_tables(positions: torch.Tensor, F: int, C: int, head_dim: int, base: float) -> tuple:
    """FAMLayer._fam_rope's tables: cos_q, sin_q, cos_k, sin_k [T, F, b, 1, d]."""
    starts = positions[:, 0::C]  # [b, T]
    ends = positions[:, C - 1 :: C] + 1
    if ends.shape[1] < starts.shape[1]:  # a partial last block ends at the last token
        ends = torch.cat([ends, positions[:, -1:] + 1], dim=1)
    offsets = torch.arange(F, dtype=positions.dtype, device=positions.device) - F
    tables = []
    for anchor in (ends, starts):  # queries end at the block's end, keys before its start
        cos, sin = rope_angles(anchor[:, :, None] + offsets, head_dim, base)
        tables += [t.permute(1, 2, 0, 3)[:, :, :, None].contiguous() for t in (cos, sin)]
    return tuple(tables)


@functools.lru_cache(maxsize=8)
def _scan_mappings(sequence_parallel: bool, tensor_parallel_size: int, group):
    """The scan's TP mappings (model/scan_step.py), one object per group: a compiled step guards
    on them, so every layer must pass the same ones."""
    if sequence_parallel:  # FAM rows sharded along F, like the tokens along S
        return (functools.partial(gather_from_sequence_parallel_region, group=group),
                functools.partial(reduce_scatter_to_sequence_parallel_region, group=group))
    if tensor_parallel_size > 1:
        return (functools.partial(copy_to_tensor_model_parallel_region, group=group),
                functools.partial(reduce_from_tensor_model_parallel_region, group=group))
    return None, None
