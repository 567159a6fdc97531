"""The training step's optimizer and autocast for a benchmark cell, by train.precision, shared by
benchmarks/train_step.py's rows and benchmarks/micro_chunk_step.py's micro-chunk rows (which
train_step imports, so the builder lives in neither) so both measure the step training runs.

    opt = build_step_optimizer(model, "bf16-mixed")   # turns the model's weights bf16, fp32 masters
    with step_autocast("cuda", "bf16-mixed"): ...     # autocast on for every bf16 precision
"""

from __future__ import annotations

import torch

from pipeline.config.tree import OptimConfig
from pipeline.training.optim import build_optimizer
from pipeline.training.precision import MixedPrecisionOptimizer

STEP_PRECISIONS = ("bf16-mixed", "bf16-autocast", "fp32")  # train.precision, `auto` made concrete


def build_step_optimizer(model: torch.nn.Module, precision: str):
    """The training step's optimizer for train.precision `precision` (bf16-mixed turns the model's
    weights bf16 and keeps fp32 masters and fp32 gradient buffers, pipeline/training/precision.py;
    the others AdamW over the fp32 weights); fused AdamW on GPU either way."""
    if precision not in STEP_PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {', '.join(STEP_PRECISIONS)}")
    device_type = next(model.parameters()).device.type
    if precision == "bf16-mixed":
        return MixedPrecisionOptimizer(model, OptimConfig(lr=1e-4), device_type)
    return build_optimizer(model, OptimConfig(lr=1e-4), device_type)


def step_autocast(device_type: str, precision: str) -> torch.autocast:
    """bf16 autocast as the training step enters it (pipeline/training/step.py): on for bf16-mixed
    (the model's per-op policy over bf16 weights) and bf16-autocast, off for fp32."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision != "fp32")
