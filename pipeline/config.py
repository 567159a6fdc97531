"""The training config tree: typed dataclass sections, loaded as defaults <- YAML <- CLI.

    cfg = load_config("configs/demo.yaml", ["--train.steps=50", "--optim.lr=1e-3"])
    config_checks.validate(cfg, world_size=2)

Sections: `model` (model.config.ModelArgs), `data`, `optim`, `train`, `parallel`,
`checkpoint`, `tracking`, `eval` (evaluation during training, pipeline/evaluation/). YAML files
may start with `base: <file>.yaml` (read_config_tree).
CLI overrides are `--section.key=value` or `--section.key value`; values are parsed as YAML
scalars/lists (`1e-3`, `true`, `null`, `[0.9,0.95]`) and then checked against the field's type.
Unknown sections or keys raise ValueError listing the valid ones. Cross-field rules live in
`validate()` (pipeline/config_checks.py). MLflow params come from `to_flat_dict(cfg)`, the saved
YAML from `to_yaml(cfg)`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from model.config import ModelArgs, read_config_tree


def _f(default: Any, help: str) -> Any:
    """A field with a help line (shown by `python -m pipeline.train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    train_manifest: str = _f("", "manifest.json of the training shards (python -m data_prep.shard)")
    train_blend: list[str] | None = _f(None, "several training manifests mixed by train_blend_weights (replaces train_manifest)")
    train_blend_weights: list[float] | None = _f(None, "one weight per train_blend manifest; normalised, e.g. [0.7, 0.3]")
    valid_manifest: str | None = _f(None, "manifest.json of the validation shards; null: no validation")
    seq_len: int = _f(512, "tokens per sample fed to the model (the shards hold seq_len + 1)")
    micro_batch_size: int = _f(4, "samples per forward/backward on one data-parallel rank")
    global_batch_size: int = _f(8, "samples per optimizer step over all ranks; accumulation = global / (micro x dp)")
    seed: int = _f(1234, "shuffle seed of the loader")
    shuffle: bool = _f(True, "shuffle samples each epoch")
    verify_checksums: bool = _f(True, "check shard sha256 against the manifest when opening")


@dataclass
class OptimConfig:
    lr: float = _f(3e-4, "peak learning rate, reached after warmup_steps")
    min_lr: float = _f(3e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay; never applied to norms, biases, the FAM prompt")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas [beta1, beta2]")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "global gradient-norm clip; 0 disables (always explicit)")
    warmup_steps: int = _f(100, "linear warmup from 0 to lr over this many steps")
    schedule: str = _f("cosine", "decay after warmup; only 'cosine' (to min_lr at train.steps)")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps of the whole run (the LR schedule's length)")
    run_dir: str = _f("runs/default", "folder for the resolved config, summary, loss curve and (by default) checkpoints")
    log_interval_steps: int = _f(10, "steps between console/MLflow metric lines (metrics are interval means)")
    eval_interval_steps: int = _f(100, "steps between validation passes; 0: only at the end")
    eval_steps: int = _f(10, "validation batches of data.global_batch_size samples per pass (fewer if the split is smaller)")
    exit_after_steps: int | None = _f(None, "stop (with a checkpoint) after this many steps in this process, for time-limited jobs")
    max_wall_seconds: float | None = _f(None, "stop (with a checkpoint) before this many seconds of training loop would pass")
    max_nonfinite_steps: int = _f(3, "skip up to this many NaN/inf steps in a row (no update); one more stops the run")
    record_sample_keys: str | None = _f(None, "folder: each rank appends the sample keys of every step (resume/data audits)")
    seed: int = _f(1234, "seed of weights init and of the per-step RPO/RSP draws")
    rpo: bool = _f(True, "random position offset (fam-paper.md 1.6): offset ~ U[0, 2*pi*rope_base), zero w.p. 0.5")
    rsp_probability: float = _f(0.8, "random state passing: probability a step starts from the saved FAM (paper: 0.8)")
    device: str = _f("auto", "auto | cpu | cuda")
    dtype: str = _f("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16")
    peak_tflops: float | None = _f(None, "peak dense TFLOP/s per device for MFU; null: by GPU name, n/a on CPU")
    progress_bar: bool = _f(True, "tqdm bar on rank 0")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = _f(1, "TP degree (megatron-core); data parallel = world / (TP x PP)")
    pipeline_parallel_size: int = _f(1, "PP degree (torch.distributed.pipelining on megatron's PP group)")
    virtual_stages: int = _f(1, "pipeline chunks per rank; > 1 needs pipeline_schedule=interleaved_1f1b")
    pipeline_layout: list[int] | None = _f(None, "layers per pipeline chunk, e.g. [3, 2]; null: an even split")
    pipeline_schedule: str = _f("1f1b", "1f1b | interleaved_1f1b | gpipe")
    sequence_parallel: bool = _f(False, "megatron sequence parallelism inside the TP group (needs TP > 1)")
    zero_stage: int = _f(0, "0: plain data-parallel all-reduce; 1/2/3: DeepSpeed ZeRO (only 1 with PP > 1)")
    zero_offload_optimizer: bool = _f(False, "ZeRO-Offload: optimizer state and step on the CPU (zero_stage >= 1)")
    deepspeed_overrides: dict | None = _f(None, "extra DeepSpeed JSON keys, deep-merged (batch, clip, stage and "
                                                "dtype keys are derived from this config)")
    backend: str = _f("auto", "auto (nccl on GPU, gloo on CPU) | gloo | nccl")
    timeout_seconds: float = _f(600.0, "collective timeout under torchrun: a hung or dead peer raises instead of blocking")


@dataclass
class CheckpointConfig:
    enabled: bool = _f(True, "write checkpoints; false: none at all, not even at the end (speed or memory probes)")
    dir: str | None = _f(None, "checkpoint folder; null: <train.run_dir>/checkpoints")
    save_interval_steps: int = _f(100, "steps between checkpoints (one more at the end); 0: only at the end")
    keep_last: int = _f(3, "complete checkpoints to keep; older ones are deleted after a successful save")
    resume: str = _f("auto", "auto (newest complete checkpoint in dir, if any) | none | <path to a step_XXXXXXXX folder>")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "log params, metrics and artifacts to MLflow from rank 0")
    experiment: str = _f("famtron", "MLflow experiment name")
    run_name: str | None = _f(None, "MLflow run name; null: the name of train.run_dir")
    tracking_uri: str | None = _f(None, "null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    flush_interval_steps: int = _f(50, "send buffered metrics with log_batch every this many steps (and at the end)")


@dataclass
class EvalConfig:
    enabled: bool = _f(False, "evaluate during training (PassKey, loss by position): pipeline/evaluation/in_loop.py")
    interval_steps: int = _f(0, "steps between evaluations; 0: only at the end (train.steps); each one checkpoints")
    at_stop: bool = _f(False, "also evaluate where a run stops early (max_wall_seconds, a signal)")
    tokenizer: str | None = _f(None, "tokenizer spec of the PassKey prompts; null: the training manifest's")
    passkey_lengths: list[int] = _f([], "PassKey prompt lengths in tokens; []: no PassKey")
    passkey_depths: list[float] = _f([0.0, 0.5, 1.0], "key depth fractions in [0, 1]; 0: the paper's key-first prompt")
    passkey_trials: int = _f(8, "prompts (random keys) per length and depth")
    passkey_batch_size: int = _f(8, "prompts generated together")
    passkey_seed: int = _f(0, "seed of the keys: every evaluation asks for the same keys")
    position_loss_manifest: str | None = _f(None, "held-out manifest.json for loss by position; null: none")
    position_loss_length: int = _f(4096, "tokens per loss-by-position sequence")
    position_loss_sequences: int = _f(2, "held-out sequences averaged")
    position_loss_buckets: int = _f(16, "log-spaced position buckets (at most)")
    chunk_tokens: int = _f(1024, "tokens per forward call while streaming (a multiple of model.block_size)")
    max_tokens: int = _f(4_000_000, "cost bound: tokens one evaluation streams (PassKey prompts + sequences)")


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# ---------------------------------------------------------------- typed values


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field type `hint`, or ValueError naming `where`. YAML 1.1 reads `3e-4`
    as a string, so numeric strings are accepted for numeric fields."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ValueError:
                pass
        raise ValueError(f"{where}={value!r}: expected {_type_name(hint)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r}: expected a list like [a, b]")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
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


def _build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"`{where}` must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in `{where}`; valid keys: {sorted(valid)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def parse_overrides(argv: list[str]) -> dict[str, dict[str, Any]]:
    """`--section.key=value` / `--section.key value` arguments as {section: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"override --{name} has no value")
            raw, i = argv[i + 1], i + 1
        section, _, key = name.partition(".")
        if section not in SECTIONS:
            raise ValueError(f"unknown section {section!r} in --{name}; valid sections: {sorted(SECTIONS)}")
        out.setdefault(section, {})[key] = _parse_raw(raw, SECTIONS[section], key)
        i += 1
    return out


def _parse_raw(raw: str, cls: type, key: str) -> Any:
    """A CLI string as YAML, except for string fields, whose text is kept as typed."""
    hint = typing.get_type_hints(cls).get(key)
    optional_str = typing.get_origin(hint) in (Union, types.UnionType) and set(typing.get_args(hint)) == {str, type(None)}
    if hint is str or optional_str:
        return None if optional_str and raw.lower() in ("null", "none", "~") else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------- load and save


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (with `base:`) <- `--section.key=value` overrides; paths resolved."""
    tree = read_config_tree(path) if path else {}
    where = str(path) if path else "defaults"
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
    cli = parse_overrides(overrides or [])
    sections = {}
    for name, cls in SECTIONS.items():
        values = {**(tree.get(name) or {}), **cli.get(name, {})}
        sections[name] = _build_section(cls, values, name)
    return resolve_defaults(Config(**sections))


def resolve_defaults(cfg: Config) -> Config:
    """Fill the derived defaults so the saved config says what the run actually used."""
    run_dir = Path(cfg.train.run_dir)
    if cfg.checkpoint.dir is None:
        cfg.checkpoint.dir = str(run_dir / "checkpoints")
    if cfg.tracking.run_name is None:
        cfg.tracking.run_name = run_dir.name
    if cfg.tracking.tracking_uri is None:
        # An explicit config value wins over the environment, which wins over the default.
        cfg.tracking.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """{"section.key": value}: the MLflow params."""
    return {f"{s}.{k}": v for s, section in to_dict(cfg).items() for k, v in section.items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def describe_keys(cfg: Config | None = None) -> str:
    """Every `--section.key` with its value and help line: the body of `--help`. The value is
    cfg's (a loaded --config) where given, with the built-in default beside it where they differ."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        section = None if cfg is None else getattr(cfg, name)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            value = default if section is None else getattr(section, f.name)
            differs = "" if value == default else f" (default {default!r})"
            lines.append(f"  --{name}.{f.name}={value!r}{differs}  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)
