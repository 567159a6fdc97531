"""The steps under DeepSpeed ZeRO (pipeline/parallel/zero.py): `ZeroStep` (the whole model, ZeRO-1/2/3)
and `ZeroPipelineStep` (this rank's pipeline stages, ZeRO-1).

DeepSpeed reduces the gradients over the data-parallel group, clips at optim.grad_clip and steps
inside the step's forward and backward; it discards a NaN/inf update itself, and the non-finite
guard counts the same steps (pipeline/parallel/zero.py, "Non-finite steps"). Checkpoints: the
engine writes weights and optimizer state into the step folder's `zero/` (what resume loads;
pipeline/checkpointing/zero_files.py); the model file keeps the RSP state and, for ZeRO-1/2
(whose weights are whole on every rank), the weights for consolidation-free resharding. A ZeRO
checkpoint resumes at the same TP and PP sizes only.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from model import FAMState
from pipeline.checkpointing.files import load_file
from pipeline.checkpointing.shards import model_file, rsp_from_dict, same_layout
from pipeline.config.tree import Config
from pipeline.parallel.groups import ProcessGroups
from pipeline.parallel.mpu import MegatronMPU
from pipeline.parallel.stages import pipeline_step
from pipeline.parallel.zero import (ZeroModule, build_zero3_init, build_zero_engine, grad_norm_of, zero_step_after_backward,
                                    zero_train_step)
from pipeline.parallel.zero_config import to_deepspeed_config
from pipeline.training.optim import build_optimizer
from pipeline.training.plain_step import PlainStep, StagedModel, build_pipeline_stages, build_whole_model, start_equal
from pipeline.training.step import StepBatch, uses_bf16


def engine_parts(cfg: Config, groups: ProcessGroups) -> tuple[dict, MegatronMPU]:
    """The DeepSpeed JSON of this run and DeepSpeed's view of its groups."""
    ds_config = to_deepspeed_config(cfg, groups.dp_size, uses_bf16(cfg.train.precision, groups.device))
    return ds_config, MegatronMPU.from_groups(groups)


class ZeroStep(PlainStep):
    """The whole model on this rank under a ZeRO engine (ZeRO-3: built partitioned)."""

    engine = None

    @classmethod
    def build(cls, cfg: Config, groups: ProcessGroups, accum: int) -> ZeroStep:
        ds_config, mpu = engine_parts(cfg, groups)
        stage = cfg.parallel.zero_stage
        # ZeRO-3: DeepSpeed's zero.Init partitions parameters as they are made, from DP rank 0's values.
        with build_zero3_init(ds_config, mpu) if stage == 3 else contextlib.nullcontext():
            model = build_whole_model(cfg, groups)
        if stage != 3:
            start_equal(model, groups)
        optimizer = build_optimizer(model, cfg.optim, groups.device.type)
        step = cls(cfg, groups, model, optimizer, accum)
        step.engine = build_zero_engine(ZeroModule(model=model), optimizer, ds_config, mpu)
        return step

    def forward_backward(self, batch: StepBatch, start: FAMState | None, lr: float):
        if self.micro_chunk_len:  # several backward calls per sample: outside the engine (ZeRO-1 only)
            result = {}

            def run():
                result["loss"], result["rsp"] = self.micro_batches(batch, start)
                return result["loss"]

            loss = zero_step_after_backward(self.engine, run, lr)
            return loss, grad_norm_of(self.engine), result["rsp"]
        micro_batches = [{"tokens": b[:, :-1], "labels": b[:, 1:], "state": start, "position_offset": o,
                          "return_logits": False} for b, o in zip(batch.tokens, batch.offsets)]
        # No outer autocast: DeepSpeed's bf16 runs the module in bf16 itself, and its engine turns an
        # outer autocast off inside its forward anyway (with a warning).
        result = zero_train_step(self.engine, micro_batches, lr=lr)
        next_rsp = result.first_output.state.fam_only(0) if self.uses_fam else None
        return result.loss, result.grad_norm, next_rsp

    def update(self, lr: float, skipped: bool) -> None:
        """Nothing left: the engine stepped (or discarded the step) inside forward_backward."""

    def checkpoint_files(self) -> dict:
        if self.groups.dp_rank:
            return {}
        rsp = None if self.rsp_state is None else self.rsp_state.to_dict()
        weights = None if self.cfg.parallel.zero_stage == 3 else self.state_dict()
        return {model_file(self.groups): {"model": weights, "rsp_state": rsp}}

    def write_extra(self, step: int):
        from pipeline.checkpointing.zero_files import save_zero_checkpoint

        return functools.partial(save_zero_checkpoint, self.engine, tag="zero", step=step)

    def restore(self, path: Path, trainer: dict) -> bool:
        from pipeline.checkpointing.zero_files import load_zero_checkpoint

        same_layout(path, trainer, self.groups, self.chunks, can_reshard=False)
        shard = load_file(path, model_file(self.groups), map_location=self.groups.device)
        load_zero_checkpoint(self.engine, path, "zero")
        self.rsp_state = rsp_from_dict(shard["rsp_state"])
        return True


class ZeroPipelineStep(StagedModel, ZeroStep):
    """This rank's pipeline stages under the schedule and a ZeRO-1 engine."""

    @classmethod
    def build(cls, cfg: Config, groups: ProcessGroups, accum: int) -> ZeroPipelineStep:
        ds_config, mpu = engine_parts(cfg, groups)
        stages, schedule = build_pipeline_stages(cfg, groups, accum)
        model = torch.nn.ModuleList(stage for _, stage in stages)
        start_equal(model, groups)
        optimizer = build_optimizer(model, cfg.optim, groups.device.type)
        step = cls(cfg, groups, model, optimizer, accum)
        step.stages, step.schedule = stages, schedule
        step.engine = build_zero_engine(ZeroModule(stages=stages), optimizer, ds_config, mpu)
        return step

    def forward_backward(self, batch: StepBatch, start: FAMState | None, lr: float):
        def run(*args, **kwargs):  # the schedule's forward and backward, then ZeRO-1's reduce and step
            return zero_step_after_backward(self.engine, lambda: pipeline_step(*args, **kwargs), lr)

        loss, next_rsp = self.schedule_step(batch, start, run)
        return loss, grad_norm_of(self.engine), next_rsp
