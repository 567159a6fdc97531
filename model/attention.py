"""FAM self-attention on megatron-core's tensor-parallel linears, device-agnostic.

`FAMSelfAttention` owns the weights (megatron's ColumnParallelLinear for QKV, RowParallelLinear
for the output projection) and the attention kernels the layer composes (the FAM rows' own
attention is in model/scan.py):
  - `attend_blocks`: every block's queries at once over [memory; FAM keys; blocks] with the
    mask of model/masks.py (SDPA with a dense mask on CPU, FlexAttention with a block mask on GPU,
    compiled per shape and never run eagerly: model/compile_limits.py);
  - `attend_causal`: full causal attention, the `dense` baseline (flash attention on GPU).
Tensor parallelism: heads (and query groups) are split across TP ranks; the QKV weight uses
megatron's grouped layout [g x (n/g q heads, k, v) x d] so a contiguous row split keeps whole
groups on a rank. Shapes: [s, b, n, d] inside, [s, b, h] at the edges.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F_
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from model import split_attention
from model.compile_limits import bounded_compiles
from model.config import FAMConfig
from model.masks import BlockLayout, flex_block_mask
from model.rope import split_qkv_rope


def _to_bnsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)  # [s, b, n, d] -> [b, n, s, d]


def _from_bnsd(x: torch.Tensor) -> torch.Tensor:
    b, n, s, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(s, b, n * d)  # -> [s, b, n*d]


def _flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    # Static shapes (one graph per sequence length: the fastest kernels); fullgraph, so that
    # past model.compile_limits.SHAPE_LIMIT shapes it raises instead of running eagerly.
    return torch.compile(_flex, dynamic=False, fullgraph=True)


class FAMSelfAttention(MegatronModule):
    def __init__(self, config: FAMConfig, *, tp_group):
        super().__init__(config)
        tp = config.tensor_model_parallel_size
        self.head_dim = config.kv_channels
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size,
            (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            tp_group=tp_group,
        )
        self.linear_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            tp_group=tp_group,
        )

    def project_qkv(self, x: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor):
        """x [s, b, h] (normed) -> q [s, b, n, d], k, v [s, b, g, d], RoPE at the given [b, s] positions."""
        mixed, _ = self.linear_qkv(x)
        s, b, _ = mixed.shape
        mixed = mixed.view(s, b, self.groups, self.heads_per_group + 2, self.head_dim)
        return split_qkv_rope(mixed, q_positions, k_positions, self.config.rope_base)

    def project_out(self, context: torch.Tensor) -> torch.Tensor:
        out, _ = self.linear_proj(context)
        return out

    def attend_blocks(self, q, k, v, layout: BlockLayout) -> torch.Tensor:
        """Block queries [S, b, n, d] over keys [M + R + S, b, g, d] with the FAM mask (model/masks.py)."""
        q, k, v = _to_bnsd(q), _to_bnsd(k), _to_bnsd(v)
        if q.is_cuda:
            block_mask = flex_block_mask(layout, str(q.device))
            with bounded_compiles("FlexAttention (model/attention.py)"):
                out = _compiled_flex()(q, k.to(q.dtype), v.to(q.dtype), block_mask)
        else:
            out = F_.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask(q.device), enable_gqa=True)
        return _from_bnsd(out)

    def attend_window(self, q, mem_k, mem_v, k, v, layout: BlockLayout):
        """The window part of `attend_blocks` (model/split_attention.py): block queries [S, b, n, d]
        over [memory; block tokens] -> (out [b, n, S, d], lse [b, n, S])."""
        if mem_k is not None:
            k, v = torch.cat([mem_k, k]), torch.cat([mem_v, v])
        return split_attention.attend(_to_bnsd(q), _to_bnsd(k), _to_bnsd(v), split_attention.parts(layout)[0])

    def attend_fam_and_merge(self, q, fam_k, fam_v, window, layout: BlockLayout) -> torch.Tensor:
        """The FAM part (each block's queries over its F_{t-1} keys [R, b, g, d]) merged with the
        window part: `attend_blocks`'s result, [S, b, n*d]."""
        fam = split_attention.attend(_to_bnsd(q), _to_bnsd(fam_k), _to_bnsd(fam_v), split_attention.parts(layout)[1])
        return _from_bnsd(split_attention.merge(*window, *fam))

    def attend_causal(self, q, k, v) -> torch.Tensor:
        out = F_.scaled_dot_product_attention(_to_bnsd(q), _to_bnsd(k), _to_bnsd(v), is_causal=True, enable_gqa=True)
        return _from_bnsd(out)
