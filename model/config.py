"""Model configuration: the YAML-facing `ModelArgs` and megatron's `FAMConfig`.

`ModelArgs` is the `model:` section of a famtron config file (configs/<name>.yaml). It is a
plain dataclass so the training config tree can embed it and check unknown keys.
`to_fam_config(args, ...)` derives megatron-core's `TransformerConfig` subclass from it.

Named configs live in `configs/` at the repository root. A config file may start with
`base: <other>.yaml`; its sections are then merged key by key over the base's.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F_
import yaml
from megatron.core.transformer.transformer_config import TransformerConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ATTENTION_KINDS = ("fam", "dense")


def _help(default: Any, text: str) -> Any:
    """A field with a help line (shown by `python -m pipeline.train --help`)."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclass
class ModelArgs:
    """Shape of a TransformerFAM decoder (docs/fam.md, "Model sizes"). F=0 gives BSWA."""

    num_layers: int = _help(2, "transformer layers")
    hidden_size: int = _help(64, "model width; hidden_size / num_attention_heads is the head size (even, for RoPE)")
    num_attention_heads: int = _help(4, "query heads; divisible by the TP size")
    num_query_groups: int | None = _help(None, "key/value heads (grouped-query attention); null: one per query head, "
                                               "1: multi-query")
    ffn_multiplier: float = _help(4.0, "SwiGLU hidden size = ffn_multiplier x hidden_size")
    ffn_hidden_size: int | None = _help(None, "SwiGLU hidden size; overrides ffn_multiplier when set")
    vocab_size: int = _help(256, "embedding rows; at least the tokenizer's vocabulary (the manifest's vocab_size)")
    attention: str = _help("fam", "fam (FAM, or BSWA when fam_len is 0) | dense (full causal attention)")
    block_size: int = _help(64, "C: tokens per block of block sliding-window attention")
    mem_blocks: int = _help(3, "m: previous blocks each block attends to (their keys/values are cached)")
    fam_len: int = _help(8, "F: feedback-memory (FAM) tokens per layer; 0 gives BSWA")
    rope_base: float = _help(10000.0, "RoPE base; RPO offsets are drawn from [0, 2 pi x rope_base)")
    norm_epsilon: float = _help(1e-5, "RMSNorm epsilon")
    init_method_std: float = _help(0.02, "standard deviation of the normal weight initialisation")
    recompute: bool = _help(False, "recompute each layer's activations in backward: less memory, one more forward")
    recompute_fam_scan: bool = _help(False, "with recompute: keep the FAM scan's F rows per block from the forward "
                                            "(false: one scan fewer per layer and step, for the scan's rows of every "
                                            "layer; fam-1b on an H200 2026-11-30: 36.1k against 33.1k tokens/s at 64k, "
                                            "43.3 against 36.6 GiB) or run the scan again with the rest of the layer "
                                            "(true); GPU fast scan")
    overlap_fam_scan: bool = _help(False, "GPU fast scan at tensor-parallel size 1: run the FAM scan on a second CUDA "
                                          "stream beside the window part of the block attention, merged with its FAM "
                                          "part by log-sum-exp (model/split_attention.py; measured no faster on an "
                                          "H200, 2026-11-30); false: one attention call after the scan")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or int(round(self.ffn_multiplier * self.hidden_size))

    @property
    def uses_fam(self) -> bool:
        return self.attention == "fam" and self.fam_len > 0

    def validate(self, tensor_parallel_size: int = 1, sequence_parallel: bool = False) -> None:
        """Raise one ValueError naming the field and value of the first bad setting."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"model.{name}={getattr(self, name)!r}: {why}")

        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        if self.attention not in ATTENTION_KINDS:
            bad("attention", f"must be one of {ATTENTION_KINDS}")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            bad("hidden_size", "hidden_size / num_attention_heads must be even for RoPE")
        if self.num_query_groups is not None and (
            self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups
        ):
            bad("num_query_groups", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.block_size <= 0:
            bad("block_size", "must be a positive integer (the FAM/BSWA block length C)")
        if self.mem_blocks < 0:
            bad("mem_blocks", "must be >= 0 (the number of cached previous blocks m)")
        if self.fam_len < 0:
            bad("fam_len", "must be >= 0 (0 gives block sliding-window attention)")
        if self.fam_len > self.block_size:
            bad("fam_len", f"must not exceed block_size={self.block_size}")
        if self.ffn_size <= 0:
            bad("ffn_multiplier", "gives a non-positive FFN size")
        if self.rope_base <= 0:
            bad("rope_base", "must be positive")
        if tensor_parallel_size < 1:
            raise ValueError(f"parallel.tensor_parallel_size={tensor_parallel_size}: must be >= 1")
        if self.num_attention_heads % tensor_parallel_size:
            bad("num_attention_heads", f"must be divisible by tensor_parallel_size={tensor_parallel_size}")
        if self.query_groups % tensor_parallel_size:
            raise ValueError(
                f"model.num_query_groups={self.query_groups}: must be divisible by "
                f"tensor_parallel_size={tensor_parallel_size} (use TP=1 for multi-query attention)"
            )
        if self.ffn_size % tensor_parallel_size:
            bad("ffn_hidden_size", f"FFN size {self.ffn_size} must be divisible by tensor_parallel_size={tensor_parallel_size}")
        if self.vocab_size % tensor_parallel_size:
            bad("vocab_size", f"must be divisible by tensor_parallel_size={tensor_parallel_size}")
        if sequence_parallel and self.uses_fam and self.fam_len % tensor_parallel_size:
            bad("fam_len", f"must be divisible by tensor_parallel_size={tensor_parallel_size} with sequence parallelism "
                "(the FAM rows are sharded along the token dimension)")

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of the whole (TP=1) megatron model: name -> shape."""
        h, d, n, g, ff, vocab = (self.hidden_size, self.head_dim, self.num_attention_heads, self.query_groups,
                                 self.ffn_size, self.vocab_size)
        shapes = {"embedding.weight": (vocab, h)}
        if self.uses_fam:
            shapes["fam_prompt"] = (self.fam_len, h)
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "input_norm.weight": (h,),
                p + "attention.linear_qkv.weight": ((n + 2 * g) * d, h),
                p + "attention.linear_proj.weight": (h, n * d),
                p + "pre_mlp_norm.weight": (h,),
                p + "mlp.linear_fc1.weight": (2 * ff, h),
                p + "mlp.linear_fc2.weight": (h, ff),
            })
        shapes.update({"final_norm.weight": (h,), "output_layer.weight": (vocab, h)})
        return shapes

    def num_params(self, embeddings: bool = False) -> int:
        """Parameter count: layers and final norm; embeddings, FAM prompt and output layer if asked."""
        outside = () if embeddings else ("embedding.weight", "fam_prompt", "output_layer.weight")
        return sum(math.prod(shape) for name, shape in self.parameter_shapes().items() if name not in outside)


def check_sequence_parallel_length(length: int, tensor_parallel_size: int, name: str = "sequence length") -> None:
    """Sequence parallelism splits the tokens over the TP ranks, so their number must divide. The
    one statement of this rule: pipeline/config/rules.py (data.seq_len) and the model's forward
    (the tokens it is given) both call it."""
    if length % tensor_parallel_size:
        raise ValueError(f"{name}={length} must be divisible by tensor_parallel_size={tensor_parallel_size} with "
                         "sequence parallelism (the tokens are split over the tensor-parallel ranks)")


@dataclass
class FAMConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the ModelArgs it was derived from (`args`). The FAM
    fields are read through `args` (config.fam_len is config.args.fam_len), so no field or
    default exists twice."""

    args: ModelArgs | None = None

    def __post_init__(self):
        if not isinstance(self.args, ModelArgs):
            raise TypeError("FAMConfig needs args=ModelArgs(...); build it with to_fam_config(args, ...)")
        super().__post_init__()

    vocab_size = property(lambda self: self.args.vocab_size)
    attention = property(lambda self: self.args.attention)
    block_size = property(lambda self: self.args.block_size)
    mem_blocks = property(lambda self: self.args.mem_blocks)
    fam_len = property(lambda self: self.args.fam_len)
    rope_base = property(lambda self: self.args.rope_base)
    recompute_fam_scan = property(lambda self: self.args.recompute_fam_scan)
    overlap_fam_scan = property(lambda self: self.args.overlap_fam_scan)


def to_fam_config(
    args: ModelArgs,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    cpu_initialization: bool | None = None,
) -> FAMConfig:
    """Derive megatron's config from the YAML section; validates first. Weights are
    initialised on the CPU unless CUDA is available (or as `cpu_initialization` says)."""
    args.validate(tensor_parallel_size, sequence_parallel)
    if cpu_initialization is None:
        cpu_initialization = not torch.cuda.is_available()
    return FAMConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.query_groups,
        ffn_hidden_size=args.ffn_size,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F_.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=cpu_initialization,
        perform_initialization=True,
        recompute_granularity="full" if args.recompute else None,
        recompute_method="uniform" if args.recompute else None,
        recompute_num_layers=1 if args.recompute else None,
        args=args,
    )


# ---------------------------------------------------------------- YAML files


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config name ("tiny", "fam-1b") or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if named.exists():
        return named
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ValueError(f"unknown config {str(name_or_path)!r}: not a YAML file and not one of {known}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_tree(name_or_path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """The YAML tree of a config, with `base:` files merged in (relative to the file)."""
    path = resolve_config_path(name_or_path).resolve()
    if path in _seen:
        raise ValueError(f"{path}: circular `base:` chain {[str(p) for p in _seen]}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.exists():
        base_path = resolve_config_path(Path(base).stem)
    return _merge(read_config_tree(base_path, _seen + (path,)), tree)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field type `hint`, or ValueError naming `where`. YAML 1.1 reads `3e-4`
    as a string, so numeric strings are accepted for numeric fields."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce_value(value, option, where)
            except ValueError:
                pass
        raise ValueError(f"{where}={value!r}: expected {_type_name(hint)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r}: expected a list like [a, b]")
        return [coerce_value(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint in (int, float) and not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, (int, float)):
            if hint is float:
                return float(number)
            if float(number).is_integer():
                return int(number)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is dict:
        if isinstance(value, dict):
            return value
    elif hint is Any:
        return value
    raise ValueError(f"{where}={value!r}: expected {_type_name(hint)}")


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"`{where}` must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in `{where}`; valid keys: {sorted(valid)}")
    return cls(**{k: coerce_value(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def model_args_from_dict(section: dict[str, Any], where: str = "model") -> ModelArgs:
    """Build ModelArgs, rejecting unknown keys with the list of valid ones and values of the wrong
    type by name, as the training config does (the memory estimate, a checkpoint's saved config)."""
    return build_section(ModelArgs, section, where)


def load_model_args(name_or_path: str | Path, **overrides: Any) -> ModelArgs:
    """The `model:` section of a named config or YAML file, with keyword overrides."""
    tree = read_config_tree(name_or_path)
    section = _merge(tree.get("model", {}), overrides)
    args = model_args_from_dict(section, f"{resolve_config_path(name_or_path)}: model")
    args.validate()
    return args


def nominal_size(name: str) -> float | None:
    """The size in a config's name ("fam-24b" -> 24e9), for the parameter-count report."""
    tail = name.rsplit("-", 1)[-1].lower()
    if tail.endswith("b") and tail[:-1].replace(".", "").isdigit():
        return float(tail[:-1]) * 1e9
    return None


def describe(args: ModelArgs) -> str:
    return (
        f"L={args.num_layers} d={args.hidden_size} heads={args.num_attention_heads} "
        f"groups={args.query_groups} ffn={args.ffn_size} vocab={args.vocab_size} "
        f"attention={args.attention} C={args.block_size} m={args.mem_blocks} F={args.fam_len}"
    )


__all__ = [
    "ModelArgs",
    "FAMConfig",
    "to_fam_config",
    "check_sequence_parallel_length",
    "read_config_tree",
    "resolve_config_path",
    "model_args_from_dict",
    "load_model_args",
    "nominal_size",
    "describe",
    "CONFIG_DIR",
]
