"""The training config tree: typed dataclass sections, loaded as defaults <- YAML <- CLI.

    cfg = load_config("configs/demo.yaml", ["--train.steps=50", "--optim.lr=1e-3"])
    validate(cfg, world_size=2)

Sections: `model` (model.config.ModelArgs), `data`, `optim`, `train`, `parallel`,
`checkpoint`, `tracking`. YAML files may start with `base: <file>.yaml` (read_config_tree).
CLI overrides are `--section.key=value` or `--section.key value`; values are parsed as YAML
scalars/lists (`1e-3`, `true`, `null`, `[0.9,0.95]`) and then checked against the field's type.
Unknown sections or keys raise ValueError listing the valid ones. Cross-field rules live in
`validate()`. MLflow params come from `to_flat_dict(cfg)`, the saved YAML from `to_yaml(cfg)`.
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
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


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


def describe_keys() -> str:
    """Every `--section.key`, its default and help line: the body of `--help`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  --{name}.{f.name}={default!r}  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------- cross-field rules


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size)


def grad_accumulation_steps(cfg: Config, world_size: int) -> int:
    return cfg.data.global_batch_size // (cfg.data.micro_batch_size * data_parallel_size(cfg, world_size))


def validate_parallel_keys(cfg: Config, world_size: int) -> None:
    """The parallel combination (TP x PP x DP, SP, ZeRO), with pipeline/memory.py's rules."""
    from pipeline.memory import validate_parallel

    p, d = cfg.parallel, cfg.data
    dp = data_parallel_size(cfg, world_size)
    if p.zero_stage in (2, 3) and p.pipeline_parallel_size > 1:
        raise ValueError(
            f"parallel.zero_stage={p.zero_stage} with parallel.pipeline_parallel_size={p.pipeline_parallel_size}: "
            "ZeRO-2/3 act inside each backward, which the pipeline schedule runs outside DeepSpeed; use zero_stage=1"
        )
    if p.zero_offload_optimizer and p.zero_stage == 0:
        raise ValueError("parallel.zero_offload_optimizer=true needs parallel.zero_stage >= 1")
    if p.zero_offload_optimizer and p.pipeline_parallel_size > 1:
        raise ValueError(f"parallel.zero_offload_optimizer=true with parallel.pipeline_parallel_size="
                         f"{p.pipeline_parallel_size}: DeepSpeed's offload path reduces inside backward; use PP=1")
    accum = grad_accumulation_steps(cfg, world_size)
    if p.pipeline_schedule == "interleaved_1f1b" and accum % p.pipeline_parallel_size:
        raise ValueError(
            f"parallel.pipeline_schedule=interleaved_1f1b needs micro-batches per step ({accum} = data.global_batch_size="
            f"{d.global_batch_size} / (data.micro_batch_size={d.micro_batch_size} x DP {dp})) divisible by "
            f"parallel.pipeline_parallel_size={p.pipeline_parallel_size}"
        )
    if p.sequence_parallel and p.zero_stage:
        raise ValueError(
            f"parallel.sequence_parallel=true with parallel.zero_stage={p.zero_stage}: the sequence-parallel "
            "gradient all-reduce is not wired into DeepSpeed's backward; use zero_stage=0"
        )
    if p.pipeline_layout is None and cfg.model.num_layers % (p.pipeline_parallel_size * p.virtual_stages):
        n = p.pipeline_parallel_size * p.virtual_stages
        raise ValueError(
            f"model.num_layers={cfg.model.num_layers} does not divide over {n} pipeline chunks (parallel."
            f"pipeline_parallel_size={p.pipeline_parallel_size} x parallel.virtual_stages={p.virtual_stages}); "
            "set parallel.pipeline_layout"
        )
    if p.sequence_parallel and d.seq_len % p.tensor_parallel_size:
        raise ValueError(f"data.seq_len={d.seq_len} must be divisible by parallel.tensor_parallel_size="
                         f"{p.tensor_parallel_size} with parallel.sequence_parallel=true")
    if p.sequence_parallel and p.pipeline_parallel_size > 1:
        raise ValueError(
            f"parallel.sequence_parallel=true with parallel.pipeline_parallel_size={p.pipeline_parallel_size}: the "
            "stages would pass sequence-sharded activations, which the training loop does not wire yet"
        )
    if p.deepspeed_overrides and p.zero_stage == 0:
        raise ValueError("parallel.deepspeed_overrides is set but parallel.zero_stage=0 (DeepSpeed is not used)")
    validate_parallel(cfg.model, p.tensor_parallel_size, p.pipeline_parallel_size, max(dp, 1), p.zero_stage,
                      p.sequence_parallel, p.zero_offload_optimizer, p.virtual_stages, p.pipeline_schedule, d.seq_len,
                      max(d.micro_batch_size, 1), p.pipeline_layout)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ValueError naming the key(s) of the first rule the config breaks. One clause per rule."""
    d, o, t, p, c = cfg.data, cfg.optim, cfg.train, cfg.parallel, cfg.checkpoint
    cfg.model.validate(p.tensor_parallel_size)
    if p.pipeline_parallel_size < 1:
        raise ValueError(f"parallel.pipeline_parallel_size={p.pipeline_parallel_size}: must be >= 1")
    if world_size % (p.tensor_parallel_size * p.pipeline_parallel_size):
        raise ValueError(
            f"world size {world_size} is not a multiple of parallel.tensor_parallel_size={p.tensor_parallel_size}"
            f" x parallel.pipeline_parallel_size={p.pipeline_parallel_size}"
        )
    if p.backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"parallel.backend={p.backend!r}: must be one of auto, gloo, nccl")
    if d.train_blend:
        if not d.train_blend_weights or len(d.train_blend_weights) != len(d.train_blend):
            raise ValueError(f"data.train_blend has {len(d.train_blend)} manifests but data.train_blend_weights="
                             f"{d.train_blend_weights}: give one positive weight per manifest")
        if min(d.train_blend_weights) <= 0:
            raise ValueError(f"data.train_blend_weights={d.train_blend_weights}: weights must be positive")
    elif not d.train_manifest:
        raise ValueError("data.train_manifest is not set: give the manifest.json written by python -m data_prep.shard "
                         "(or data.train_blend with data.train_blend_weights)")
    if d.seq_len < 1:
        raise ValueError(f"data.seq_len={d.seq_len}: must be >= 1")
    if cfg.model.attention == "fam" and cfg.model.block_size > d.seq_len:
        raise ValueError(
            f"data.seq_len={d.seq_len} and model.block_size={cfg.model.block_size} do not fit: a sample must hold"
            " at least one full block, or the FAM/BSWA memory is never used in training"
        )
    if d.micro_batch_size < 1:
        raise ValueError(f"data.micro_batch_size={d.micro_batch_size}: must be >= 1")
    dp = data_parallel_size(cfg, world_size)
    if d.global_batch_size < 1 or d.global_batch_size % (d.micro_batch_size * dp):
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} must be a positive multiple of data.micro_batch_size="
            f"{d.micro_batch_size} x data-parallel size {dp} (world {world_size} / TP x PP)"
        )
    validate_parallel_keys(cfg, world_size)
    if o.lr <= 0:
        raise ValueError(f"optim.lr={o.lr}: must be > 0")
    if not 0 <= o.min_lr <= o.lr:
        raise ValueError(f"optim.min_lr={o.min_lr}: must be in [0, optim.lr={o.lr}]")
    if o.weight_decay < 0:
        raise ValueError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas={o.betas}: must be two numbers in [0, 1)")
    if o.eps <= 0:
        raise ValueError(f"optim.eps={o.eps}: must be > 0")
    if o.grad_clip < 0:
        raise ValueError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables clipping)")
    if o.schedule != "cosine":
        raise ValueError(f"optim.schedule={o.schedule!r}: only 'cosine' is implemented")
    if t.steps < 1:
        raise ValueError(f"train.steps={t.steps}: must be >= 1")
    if not 0 <= o.warmup_steps <= t.steps:
        raise ValueError(f"optim.warmup_steps={o.warmup_steps}: must be in [0, train.steps={t.steps}]")
    if t.log_interval_steps < 1:
        raise ValueError(f"train.log_interval_steps={t.log_interval_steps}: must be >= 1")
    if t.eval_interval_steps < 0:
        raise ValueError(f"train.eval_interval_steps={t.eval_interval_steps}: must be >= 0 (0: only at the end)")
    if t.eval_steps < 1:
        raise ValueError(f"train.eval_steps={t.eval_steps}: must be >= 1")
    if t.exit_after_steps is not None and t.exit_after_steps < 1:
        raise ValueError(f"train.exit_after_steps={t.exit_after_steps}: must be >= 1 or null")
    if t.max_wall_seconds is not None and t.max_wall_seconds <= 0:
        raise ValueError(f"train.max_wall_seconds={t.max_wall_seconds}: must be > 0 or null")
    if t.max_nonfinite_steps < 0:
        raise ValueError(f"train.max_nonfinite_steps={t.max_nonfinite_steps}: must be >= 0")
    if p.timeout_seconds <= 0:
        raise ValueError(f"parallel.timeout_seconds={p.timeout_seconds}: must be > 0")
    if not 0 <= t.rsp_probability <= 1:
        raise ValueError(f"train.rsp_probability={t.rsp_probability}: must be in [0, 1]")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device={t.device!r}: must be one of auto, cpu, cuda")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.dtype={t.dtype!r}: must be one of auto, fp32, bf16")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ValueError(f"train.peak_tflops={t.peak_tflops}: must be > 0 or null")
    if c.save_interval_steps < 0:
        raise ValueError(f"checkpoint.save_interval_steps={c.save_interval_steps}: must be >= 0 (0: only at the end)")
    if c.keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={c.keep_last}: must be >= 1")
    if c.resume not in ("auto", "none") and not Path(c.resume).is_dir():
        raise ValueError(f"checkpoint.resume={c.resume!r}: must be auto, none or an existing checkpoint folder")
    if cfg.tracking.flush_interval_steps < 1:
        raise ValueError(f"tracking.flush_interval_steps={cfg.tracking.flush_interval_steps}: must be >= 1")
