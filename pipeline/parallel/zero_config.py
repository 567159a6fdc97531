"""The DeepSpeed JSON of a famtron run, derived from the typed config by a pure function.

    ds_config = to_deepspeed_config(cfg, dp_size=2, bf16=False)   # cfg: pipeline/config/tree.py Config

DeepSpeed 0.19.8 clips at 1.0 unless told otherwise, so `gradient_clipping` is always written
from the caller's value and a user override cannot change it (OWNED_KEYS). Overrides that would
turn off DeepSpeed's non-finite check, which famtron's step skipping relies on, are refused
(NONFINITE_CHECK_KEYS; pipeline/parallel/zero.py). With PP the schedule's micro-batches are the
accumulation, so the engine runs with gradient_accumulation_steps=1.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from pipeline.config.rules import check_zero
from pipeline.config.tree import Config

ZERO_STAGES = (1, 2, 3)

# Keys derived from famtron's typed config: a user JSON may not change them (set the config key).
OWNED_KEYS = {
    "gradient_clipping": "optim.grad_clip",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "data.global_batch_size / (micro_batch_size x DP)",
    "train_batch_size": "data.global_batch_size",
    "zero_optimization.stage": "the ZeRO stage",
    "bf16.enabled": "train.precision",
}


# DeepSpeed settings its non-finite check needs (see the module docstring): must stay True.
NONFINITE_CHECK_KEYS = ("bf16.check_grad_overflow", "zero_optimization.compute_grad_norm")


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def to_deepspeed_config(cfg: Config, dp_size: int, bf16: bool) -> dict:
    """The DeepSpeed JSON of `cfg` (pure) for `dp_size` data-parallel ranks, bf16 or fp32.
    parallel.deepspeed_overrides is deep-merged on top; it may tune anything except the keys in
    OWNED_KEYS, which must agree with the derived values (ValueError otherwise). With PP > 1 the
    schedule's micro-batches are the accumulation: the engine sees one batch of micro_batch_size x
    accumulation samples per step."""
    p, d = cfg.parallel, cfg.data
    zero_stage, pipeline_parallel_size = p.zero_stage, p.pipeline_parallel_size
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"parallel.zero_stage={zero_stage!r}: DeepSpeed runs ZeRO stages {ZERO_STAGES}; without "
                         "ZeRO, data parallelism is the plain step's gradient all-reduce")
    check_zero(zero_stage, pipeline_parallel_size, p.zero_offload_optimizer)  # pipeline/config/rules.py
    accum = d.global_batch_size // (d.micro_batch_size * dp_size)
    # Backward outside the engine (the pipeline schedule, or micro-chunks: pipeline/parallel/zero.py
    # zero_step_after_backward): the step's micro-batches are one engine batch.
    external = pipeline_parallel_size > 1 or bool(cfg.train.micro_chunk_len)
    micro_batch_size, grad_accum_steps = (d.micro_batch_size * accum, 1) if external else (d.micro_batch_size, accum)
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": False}
    if zero_stage in (1, 2):
        # Saves each partition's optimizer state unflattened per parameter, so a checkpoint loads at
        # another data-parallel size (pipeline/checkpointing/zero_files.py).
        zero["elastic_checkpoint"] = True
    if external:
        zero["contiguous_gradients"] = False  # no per-parameter hooks firing inside the schedule's backward
    if p.zero_offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * dp_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # famtron's torch AdamW (pipeline/training/optim.py)
        "zero_force_ds_cpu_optimizer": False,  # offload may step a torch optimizer (DeepSpeedCPUAdam is faster)
        "steps_per_print": 2**31 - 1,  # famtron logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if not p.deepspeed_overrides:
        return config
    merged = _deep_merge(config, p.deepspeed_overrides)
    for key, source in OWNED_KEYS.items():
        if _lookup(merged, key) != _lookup(config, key):
            raise ValueError(
                f"DeepSpeed override {key}={_lookup(merged, key)!r} contradicts the derived {_lookup(config, key)!r}; "
                f"set {source} instead"
            )
    for key in NONFINITE_CHECK_KEYS:
        if _lookup(merged, key) is False:
            raise ValueError(f"DeepSpeed override {key}=false: it would let a NaN/inf step update the weights; "
                             "famtron skips such steps (train.max_nonfinite_steps): remove the override")
    return merged
