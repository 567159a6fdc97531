"""Weight mapping between the reference (model/reference.py) and the megatron model.

    reference                       megatron (this TP rank's shard, rank r of p)
    embed [V, h]                    embedding.weight          rows  r*V/p : (r+1)*V/p
    fam_prompt [F, h]               fam_prompt                (replicated)
    layers.i.attn_norm [h]          layers.i.input_norm.weight
    wq [n*d,h], wk, wv [g*d,h]      layers.i.attention.linear_qkv.weight: grouped layout, per
                                    query group j: [q heads of j (n/g*d); k_j (d); v_j (d)];
                                    rank r holds groups r*g/p : (r+1)*g/p
    wo [h, n*d]                     layers.i.attention.linear_proj.weight  cols of rank r's heads
    mlp_norm [h]                    layers.i.pre_mlp_norm.weight
    w_gate, w_up [ff, h]            layers.i.mlp.linear_fc1.weight = [gate rows r; up rows r]
                                    (megatron's GLU chunks the local output in two)
    w_down [h, ff]                  layers.i.mlp.linear_fc2.weight         cols r*ff/p : (r+1)*ff/p
    final_norm [h]                  final_norm.weight
    lm_head [V, h]                  output_layer.weight       rows  r*V/p : (r+1)*V/p
"""

from __future__ import annotations

import torch

from model.config import ModelArgs


def _rows(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return w.chunk(size, dim=0)[rank]


def _cols(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return w.chunk(size, dim=1)[rank]


def grouped_qkv(args: ModelArgs, wq, wk, wv) -> torch.Tensor:
    """[wq; wk; wv] in megatron's grouped layout [g, (n/g + 2), d, h] -> [(n + 2g) * d, h]."""
    g, d, h = args.query_groups, args.head_dim, args.hidden_size
    q = wq.view(g, args.num_attention_heads // g, d, h)
    return torch.cat([q, wk.view(g, 1, d, h), wv.view(g, 1, d, h)], dim=1).reshape(-1, h)


def megatron_state_from_reference(reference, args: ModelArgs, tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """The megatron model's state dict (this TP rank's shard) holding the reference's weights."""
    out = {"embedding.weight": _rows(reference.embed, tp_rank, tp_size)}
    if reference.fam_prompt is not None:
        out["fam_prompt"] = reference.fam_prompt
    for i, layer in enumerate(reference.layers):
        p = f"layers.{i}."
        out[p + "input_norm.weight"] = layer.attn_norm
        out[p + "attention.linear_qkv.weight"] = _rows(grouped_qkv(args, layer.wq, layer.wk, layer.wv), tp_rank, tp_size)
        out[p + "attention.linear_proj.weight"] = _cols(layer.wo, tp_rank, tp_size)
        out[p + "pre_mlp_norm.weight"] = layer.mlp_norm
        gate, up = _rows(layer.w_gate, tp_rank, tp_size), _rows(layer.w_up, tp_rank, tp_size)
        out[p + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        out[p + "mlp.linear_fc2.weight"] = _cols(layer.w_down, tp_rank, tp_size)
    out["final_norm.weight"] = reference.final_norm
    out["output_layer.weight"] = _rows(reference.lm_head, tp_rank, tp_size)
    return {k: v.detach().clone() for k, v in out.items()}


@torch.no_grad()
def load_reference_weights(model, reference, args: ModelArgs, tp_rank: int = 0, tp_size: int = 1) -> None:
    state = megatron_state_from_reference(reference, args, tp_rank, tp_size)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("_extra_state"))
    if missing:
        raise KeyError(f"reference mapping misses megatron parameters {missing}")
    for name, value in state.items():
        own[name].copy_(value)


def reference_grads_as_megatron(reference, args: ModelArgs, tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """The reference's gradients mapped like its weights (for gradient comparisons)."""

    class _Grads:
        pass

    g = _Grads()
    g.embed, g.fam_prompt = reference.embed.grad, None if reference.fam_prompt is None else reference.fam_prompt.grad
    g.final_norm, g.lm_head = reference.final_norm.grad, reference.lm_head.grad
    g.layers = []
    for layer in reference.layers:
        lg = _Grads()
        for name in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"):
            setattr(lg, name, getattr(layer, name).grad)
        g.layers.append(lg)
    return megatron_state_from_reference(g, args, tp_rank, tp_size)
