"""Everything a run trains with, built once: process groups, the layout's step, loaders, guards.

    groups = start(cfg)                # config rules and inputs checked first, then the groups
    tr = build_trainer(cfg, groups)    # tr.strategy: PlainStep, PipelineStep, ZeroStep or ZeroPipelineStep

`build_step` is the one place a layout is chosen: pipeline parallelism or not, ZeRO or not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config.rules import grad_accumulation_steps, validate
from pipeline.config.tree import Config
from pipeline.data.inputs import build_loaders, check_inputs
from pipeline.parallel.groups import ProcessGroups, launch_world_size, start_groups
from pipeline.training.console import setup_logging
from pipeline.training.fault import NonFiniteGuard, SampleKeyRecorder
from pipeline.training.plain_step import PipelineStep, PlainStep
from pipeline.training.step import TrainStep
from pipeline.training.zero_step import ZeroPipelineStep, ZeroStep


@dataclass
class Trainer:
    """What the loop works on: the step count, the layout's step, the loaders and the guards."""

    cfg: Config
    groups: ProcessGroups
    strategy: TrainStep
    loader: Any
    valid_loader: Any
    step: int = 0  # optimizer steps done
    nonfinite: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(0))
    keys: SampleKeyRecorder = field(default_factory=lambda: SampleKeyRecorder(None, 0))
    evaluator: Any = None  # pipeline/evaluation/in_loop.py: PassKey / loss by position (eval section)


def start(cfg: Config) -> ProcessGroups:
    """Everything before the model: the config rules and the inputs (before any process group
    exists to hang on), process groups with timeouts, rank-0 logging, seeds."""
    validate(cfg, launch_world_size())
    check_inputs(cfg)
    p = cfg.parallel
    groups = start_groups(p.tensor_parallel_size, p.pipeline_parallel_size, p.backend, p.timeout_seconds,
                          cfg.train.device)
    setup_logging(groups.is_rank0)
    seed_everything(cfg.train.seed, groups)
    return groups


def seed_everything(seed: int, groups: ProcessGroups) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if groups.device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        # GPU init of TP layers draws from megatron's tracker, seeded per TP rank
        model_parallel_cuda_manual_seed(seed, tp_rank=groups.tp_rank, ep_rank=0, etp_rank=0)


def build_step(cfg: Config, groups: ProcessGroups, accum: int) -> TrainStep:
    """The layout's training step, with its model (or this rank's stages), optimizer and engine."""
    p = cfg.parallel
    if p.pipeline_parallel_size > 1:
        layout = ZeroPipelineStep if p.zero_stage else PipelineStep
    else:
        layout = ZeroStep if p.zero_stage else PlainStep
    return layout.build(cfg, groups, accum)


def build_trainer(cfg: Config, groups: ProcessGroups) -> Trainer:
    """The seeded step (model, optimizer, engine) and loaders on the groups of `start`."""
    strategy = build_step(cfg, groups, grad_accumulation_steps(cfg, groups.world_size))
    loader, valid_loader = build_loaders(cfg.data, groups.dp_rank, groups.dp_size)
    return Trainer(cfg, groups, strategy, loader, valid_loader, nonfinite=NonFiniteGuard(cfg.train.max_nonfinite_steps),
                   keys=SampleKeyRecorder(cfg.train.record_sample_keys, groups.rank))
