"""famtron <-> Hugging Face names, layouts and config: pure functions, no files.

A famtron full-model state dict uses the TP=1 megatron names of model/weights.py (TP shards
merged with `merge_megatron_shards` first). The exported model (pipeline/hf/modeling_famtron.py)
uses transformers' usual names, with Q, K, V and gate, up as separate matrices:

    famtron (TP=1)                           Hugging Face
    embedding.weight [V, h]                  model.embed_tokens.weight
    fam_prompt [F, h]                        model.fam_prompt                      (FAM only)
    layers.i.input_norm.weight               model.layers.i.input_layernorm.weight
    layers.i.attention.linear_qkv.weight     model.layers.i.self_attn.q_proj / k_proj / v_proj
        megatron's grouped layout: per query group j, [n/g q heads; k_j; v_j] x d rows;
        q_proj [n*d, h] = the q heads in order, k_proj, v_proj [g*d, h]
    layers.i.attention.linear_proj.weight    model.layers.i.self_attn.o_proj.weight
    layers.i.pre_mlp_norm.weight             model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.linear_fc1.weight [2ff, h]  model.layers.i.mlp.gate_proj ([:ff]) / up_proj ([ff:])
    layers.i.mlp.linear_fc2.weight           model.layers.i.mlp.down_proj.weight
    final_norm.weight                        model.norm.weight
    output_layer.weight                      lm_head.weight
Both directions copy values exactly (slices and concatenations), so a round trip is bit for bit.
"""

from __future__ import annotations

import torch

from model.config import ModelArgs
from model.weights import grouped_qkv

MODEL_TYPE = "famtron"
AUTO_MAP = {
    "AutoConfig": "configuration_famtron.FAMtronConfig",
    "AutoModelForCausalLM": "modeling_famtron.FAMtronForCausalLM",
}
ARCHITECTURE = "FAMtronForCausalLM"

_PLAIN = {  # famtron suffix -> HF suffix, per layer; copied as they are
    "input_norm.weight": "input_layernorm.weight",
    "attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP = {
    "embedding.weight": "model.embed_tokens.weight",
    "fam_prompt": "model.fam_prompt",
    "final_norm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def attention_kind(args: ModelArgs) -> str:
    """"fam", "bswa" (FAM layers with F = 0) or "dense"."""
    if args.attention == "dense":
        return "dense"
    return "fam" if args.fam_len else "bswa"


def check_famtron_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The state's parameters (megatron's `_extra_state` entries dropped), checked against the
    names and shapes ModelArgs describes; one ValueError listing what differs."""
    params = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    expected = args.parameter_shapes()
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the state dict does not match the model config: missing {missing[:6]}, unexpected {unexpected[:6]} "
            "(pass a whole TP=1 model: merge TP shards with model.weights.merge_megatron_shards)"
        )
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"state dict {name}: shape {tuple(params[name].shape)}, the model config says {shape}")
    return params


def to_hf_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """famtron TP=1 state dict -> the HF model's state dict (contiguous copies), in model order."""
    params = check_famtron_state(state, args)
    n, g, d, h, ff = args.num_attention_heads, args.query_groups, args.head_dim, args.hidden_size, args.ffn_size
    out = {_TOP["embedding.weight"]: params["embedding.weight"]}
    if "fam_prompt" in params:
        out[_TOP["fam_prompt"]] = params["fam_prompt"]
    for i in range(args.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        qkv = params[src + "attention.linear_qkv.weight"].view(g, n // g + 2, d, h)
        fc1 = params[src + "mlp.linear_fc1.weight"]
        out[dst + "input_layernorm.weight"] = params[src + "input_norm.weight"]
        out[dst + "self_attn.q_proj.weight"] = qkv[:, : n // g].reshape(n * d, h)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, -2].reshape(g * d, h)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, -1].reshape(g * d, h)
        out[dst + "self_attn.o_proj.weight"] = params[src + "attention.linear_proj.weight"]
        out[dst + "post_attention_layernorm.weight"] = params[src + "pre_mlp_norm.weight"]
        out[dst + "mlp.gate_proj.weight"] = fc1[:ff]
        out[dst + "mlp.up_proj.weight"] = fc1[ff:]
        out[dst + "mlp.down_proj.weight"] = params[src + "mlp.linear_fc2.weight"]
    out[_TOP["final_norm.weight"]] = params["final_norm.weight"]
    out[_TOP["output_layer.weight"]] = params["output_layer.weight"]
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def from_hf_state(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state: HF state dict -> famtron TP=1 state dict."""
    expected = set(to_hf_names(args))
    missing, unexpected = sorted(expected - set(hf)), sorted(set(hf) - expected)
    if missing or unexpected:
        raise ValueError(f"the weights do not match config.json: missing {missing[:6]}, unexpected {unexpected[:6]}")
    out = {src: hf[dst] for src, dst in _TOP.items() if dst in hf}
    for i in range(args.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for famtron_suffix, hf_suffix in _PLAIN.items():
            out[src + famtron_suffix] = hf[dst + hf_suffix]
        wq, wk, wv = (hf[dst + f"self_attn.{p}_proj.weight"] for p in "qkv")
        out[src + "attention.linear_qkv.weight"] = grouped_qkv(args, wq, wk, wv)
        gate, up = hf[dst + "mlp.gate_proj.weight"], hf[dst + "mlp.up_proj.weight"]
        out[src + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
    return {k: v.contiguous() for k, v in check_famtron_state(out, args).items()}


def to_hf_names(args: ModelArgs) -> list[str]:
    """The HF model's parameter names for these args, in model order."""
    famtron_names = args.parameter_shapes()
    names = [_TOP[k] for k in ("embedding.weight", "fam_prompt") if k in famtron_names]
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        names += [p + s for s in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")]
    return names + [_TOP["final_norm.weight"], _TOP["output_layer.weight"]]


def to_hf_config(args: ModelArgs, dtype: torch.dtype, tokens: dict) -> dict:
    """config.json's content. `tokens`: eos/pad ids and which tokenizer file ships
    (pipeline/hf/tokenizer_files.py)."""
    args.validate()
    kind = attention_kind(args)
    return {
        "architectures": [ARCHITECTURE],
        "auto_map": AUTO_MAP,
        "model_type": MODEL_TYPE,
        "attention_kind": kind,
        "block_size": args.block_size,
        "mem_blocks": args.mem_blocks,
        "fam_len": args.fam_len if kind == "fam" else 0,
        "rope_base": float(args.rope_base),
        "rms_norm_eps": float(args.norm_epsilon),
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.query_groups,
        "intermediate_size": args.ffn_size,
        "vocab_size": args.vocab_size,
        "initializer_range": float(args.init_method_std),
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        **tokens,
    }


CONFIG_KEYS = ("attention_kind", "block_size", "mem_blocks", "fam_len", "rope_base", "rms_norm_eps", "hidden_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
               "initializer_range")


def args_from_hf_config(config: dict, where: str = "config.json") -> ModelArgs:
    """config.json's content -> ModelArgs; one ValueError naming the key for anything the
    modeling file (and so famtron) cannot run."""
    from pipeline.hf.configuration_famtron import FAMtronConfig

    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{where}: model_type={config.get('model_type')!r}, expected {MODEL_TYPE!r} "
                         "(a famtron export)")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    try:
        FAMtronConfig(**{k: config[k] for k in CONFIG_KEYS})  # the modeling file's own checks
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    args = ModelArgs(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config["num_key_value_heads"],
        ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        attention="dense" if config["attention_kind"] == "dense" else "fam",
        block_size=config["block_size"],
        mem_blocks=config["mem_blocks"],
        fam_len=config["fam_len"],
        rope_base=config["rope_base"],
        norm_epsilon=config["rms_norm_eps"],
        init_method_std=config["initializer_range"],
    )
    args.validate()
    return args
