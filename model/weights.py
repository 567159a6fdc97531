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


# How each megatron parameter is split over TP ranks: "rows", "cols", "glu" (rows of the gate
# and up halves separately) or replicated (absent).
def _split_kind(name: str) -> str | None:
    if name in ("embedding.weight", "output_layer.weight") or name.endswith("linear_qkv.weight"):
        return "rows"
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return "cols"
    if name.endswith("linear_fc1.weight"):
        return "glu"
    return None


def shard_megatron_state(full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """A TP=1 megatron state dict -> rank tp_rank's shard of a TP=tp_size model."""
    out = {}
    for name, w in full.items():
        kind = _split_kind(name)
        if kind == "rows":
            out[name] = _rows(w, tp_rank, tp_size)
        elif kind == "cols":
            out[name] = _cols(w, tp_rank, tp_size)
        elif kind == "glu":
            gate, up = w.chunk(2, dim=0)
            out[name] = torch.cat([_rows(gate, tp_rank, tp_size), _rows(up, tp_rank, tp_size)])
        else:
            out[name] = w
    return out


def merge_megatron_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of shard_megatron_state: TP shards in rank order -> one TP=1 state dict."""
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        kind = _split_kind(name)
        if kind == "rows":
            out[name] = torch.cat(parts, dim=0)
        elif kind == "cols":
            out[name] = torch.cat(parts, dim=1)
        elif kind == "glu":
            halves = [p.chunk(2, dim=0) for p in parts]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out[name] = parts[0]
    return out


def megatron_state_from_reference(reference, args: ModelArgs, tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """The megatron model's state dict (this TP rank's shard) holding the reference's weights."""
    full = {"embedding.weight": reference.embed}
    if reference.fam_prompt is not None:
        full["fam_prompt"] = reference.fam_prompt
    for i, layer in enumerate(reference.layers):
        p = f"layers.{i}."
        full[p + "input_norm.weight"] = layer.attn_norm
        full[p + "attention.linear_qkv.weight"] = grouped_qkv(args, layer.wq, layer.wk, layer.wv)
        full[p + "attention.linear_proj.weight"] = layer.wo
        full[p + "pre_mlp_norm.weight"] = layer.mlp_norm
        full[p + "mlp.linear_fc1.weight"] = torch.cat([layer.w_gate, layer.w_up])
        full[p + "mlp.linear_fc2.weight"] = layer.w_down
    full["final_norm.weight"] = reference.final_norm
    full["output_layer.weight"] = reference.lm_head
    return {k: v.detach().clone() for k, v in shard_megatron_state(full, tp_rank, tp_size).items()}


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
