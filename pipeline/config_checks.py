"""The cross-field rules of the training config (pipeline/config.py): `validate()`, one clause per rule.

    validate(cfg, world_size=2)   # ValueError naming the key(s) of the first rule broken

Also the derived batch shape: data-parallel size and gradient-accumulation steps per optimizer step,
and which keys a run may change when it resumes (RESUME_SAFE_KEYS, check_resume_config).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import Config
from pipeline.evaluation.settings import validate_eval


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
    validate_eval(cfg)  # the eval section's rules (pipeline/evaluation/settings.py)


# ---------------------------------------------------------------- resuming with another config

# The keys a run may change when it resumes from its own checkpoint; any other difference from the
# checkpoint's config.yaml is refused (check_resume_config). A key is here when changing it alters
# neither the trained model's math nor the meaning of what was already logged; a trailing "." means
# the whole section. Not here, on purpose: every other model.* key, data.* (manifests, seq_len,
# batch sizes, seed and shuffle fix the sample order that the loader resumes in; eval_steps and
# valid_manifest what val_loss means), optim.* (a schedule changed midway is another run),
# train.seed/rpo/rsp_probability/dtype/device (with dtype=auto a GPU trains in bf16),
# parallel.zero_stage/zero_offload_optimizer/deepspeed_overrides (the optimizer state's format),
# parallel.sequence_parallel (the saved RSP state holds this rank's F/TP FAM rows under SP, all F
# without).
RESUME_SAFE_KEYS = (
    "model.recompute",  # recompute repeats the same forward: memory for time, same numbers
    "data.verify_checksums",
    "train.steps",  # to train on (the cosine schedule stretches from the resumed step on) or stop earlier
    "train.run_dir",  # where outputs go: a run folder moved to another filesystem
    "train.log_interval_steps", "train.eval_interval_steps", "train.exit_after_steps", "train.max_wall_seconds",
    "train.max_nonfinite_steps", "train.record_sample_keys", "train.peak_tflops", "train.progress_bar",
    # TP and PP sizes and the pipeline layout: pipeline/trainer_state.py restore reshards the weights
    # (AdamW moments restart) without ZeRO and refuses, naming sizes and layout, where it cannot.
    "parallel.tensor_parallel_size", "parallel.pipeline_parallel_size", "parallel.virtual_stages",
    "parallel.pipeline_layout", "parallel.pipeline_schedule", "parallel.backend", "parallel.timeout_seconds",
    "checkpoint.",  # enabled, dir, save_interval_steps, keep_last, resume
    "tracking.",
    "eval.",  # what and when to evaluate: reads the model, never changes it (pipeline/evaluation/in_loop.py)
)


def is_resume_safe(key: str) -> bool:
    return key in RESUME_SAFE_KEYS or key.split(".", 1)[0] + "." in RESUME_SAFE_KEYS


def _flat(tree: dict) -> dict[str, object]:
    return {f"{s}.{k}": v for s, section in tree.items() if isinstance(section, dict) for k, v in section.items()}


def resume_config_changes(saved_yaml: str, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this run's value) of every key outside RESUME_SAFE_KEYS that
    differs. Both sides go through YAML, so types compare alike; a key the checkpoint's config
    lacks (written by an older famtron) is not compared."""
    from pipeline.config import to_yaml

    saved, now = _flat(yaml.safe_load(saved_yaml) or {}), _flat(yaml.safe_load(to_yaml(cfg)))
    return [(key, saved[key], value) for key, value in now.items()
            if key in saved and saved[key] != value and not is_resume_safe(key)]


def check_resume_config(saved_yaml: str, cfg: Config, checkpoint: str | Path) -> None:
    """ValueError naming each key that differs from the checkpoint's config and may not (old -> new)."""
    changes = resume_config_changes(saved_yaml, cfg)
    if changes:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
        raise ValueError(
            f"checkpoint {checkpoint} was trained with another config: {listed}. These keys cannot change when a run "
            "resumes (pipeline/config_checks.py RESUME_SAFE_KEYS lists those that can): give a new train.run_dir (or "
            "checkpoint.dir) to start another run with them, or set them back to resume this one"
        )
