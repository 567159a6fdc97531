"""The steps without DeepSpeed: `PlainStep` (the whole model on this rank, TP inside) and
`PipelineStep` (this rank's pipeline stages under a torch.distributed.pipelining schedule).

Both: gradient accumulation over the step's micro-batches, gradients averaged over the
data-parallel group (one coalesced all-reduce per dtype), TP- and PP-aware global-norm clipping
(pipeline/training/optim.py), then AdamW, skipped on a non-finite step. With PP the schedule runs
the accum micro-batches itself (it scales gradients by 1 / accum) and the loss lives on the last
stage. Both save their weights under the plain model's names (a pipeline stage under global
layer indices), so a checkpoint resumes at other TP and PP sizes weights-only
(pipeline/checkpointing/shards.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model import FAMState, LayerState, build_model
from model.micro_chunks import micro_chunked_forward_backward, micro_chunked_loss
from pipeline.checkpointing.files import load_file
from pipeline.checkpointing.shards import model_file, optim_file, read_resharded, rsp_from_dict, same_layout
from pipeline.config.rules import micro_chunks_per_sample
from pipeline.config.tree import Config
from pipeline.parallel.collectives import all_reduce_sum, average_gradients, broadcast_tensors
from pipeline.parallel.groups import ProcessGroups
from pipeline.parallel.stages import (build_schedule, build_stages, load_stage_state_dict, pipeline_step,
                                      split_micro_chunks, stage_state_dict)
from pipeline.training.optim import build_optimizer, clip_grads, set_lr
from pipeline.training.precision import (MixedPrecisionOptimizer, load_master_weights, resolve_precision,
                                         with_master_weights)
from pipeline.training.step import StepBatch, TrainStep


def build_whole_model(cfg: Config, groups: ProcessGroups) -> torch.nn.Module:
    """This rank's TP shard of the whole model, drawn from train.seed (model/init.py)."""
    return build_model(cfg.model, params_dtype=torch.float32, device=groups.device, seed=cfg.train.seed,
                       sequence_parallel=cfg.parallel.sequence_parallel, tp_group=groups.tp_group)


def build_pipeline_stages(cfg: Config, groups: ProcessGroups, accum: int):
    """This rank's stages, built and initialised alone, and the schedule over them; the step's
    accum x micro_batch_size sequences are its accum micro-batches."""
    p = cfg.parallel
    stages = build_stages(cfg.model, groups.pp_rank, groups.pp_size, p.virtual_stages, p.pipeline_layout,
                          params_dtype=torch.float32, device=groups.device, seed=cfg.train.seed,
                          sequence_parallel=p.sequence_parallel, tp_group=groups.tp_group)
    micro_batches = accum * micro_chunks_per_sample(cfg)  # truncated micro-chunks are micro-batches too
    schedule = build_schedule(stages, groups.pp_size, micro_batches, p.pipeline_schedule, groups.pp_group, groups.device)
    return stages, schedule


def build_plain_optimizer(model: torch.nn.Module, cfg: Config, groups: ProcessGroups):
    """AdamW over the fp32 weights, or, for train.precision bf16-mixed, over fp32 masters of the
    weights it turns bf16 (pipeline/training/precision.py). Called after `start_equal`, so every
    data-parallel rank's masters are rank 0's fp32 values."""
    if resolve_precision(cfg.train.precision, groups.device) == "bf16-mixed":
        return MixedPrecisionOptimizer(model, cfg.optim, groups.device.type)
    return build_optimizer(model, cfg.optim, groups.device.type)


def start_equal(model: torch.nn.Module, groups: ProcessGroups) -> None:
    """Data-parallel replicas start identical: DP rank 0's values everywhere."""
    broadcast_tensors([p.data for p in model.parameters() if p.requires_grad], groups.dp_group)


class PlainStep(TrainStep):
    """The whole model on this rank (TP shards inside), no DeepSpeed."""

    @classmethod
    def build(cls, cfg: Config, groups: ProcessGroups, accum: int) -> PlainStep:
        model = build_whole_model(cfg, groups)
        start_equal(model, groups)
        return cls(cfg, groups, model, build_plain_optimizer(model, cfg, groups), accum)

    def forward_backward(self, batch: StepBatch, start: FAMState | None, lr: float):
        self.optimizer.zero_grad(set_to_none=True)
        loss, next_rsp = self.micro_batches(batch, start)
        average_gradients(self.grad_params, self.groups.dp_group)
        grad_norm = clip_grads(self.grad_params, self.cfg.optim.grad_clip, self.groups.tp_group, self.groups.pp_group)
        return loss, grad_norm, next_rsp

    def micro_batches(self, batch: StepBatch, start: FAMState | None) -> tuple[torch.Tensor, FAMState | None]:
        """Gradient accumulation; returns (mean loss, RSP state to keep)."""
        step_loss, next_rsp = torch.zeros((), device=self.groups.device), None
        for a, (tokens, offset) in enumerate(zip(batch.tokens, batch.offsets)):
            loss, state = self.micro_batch(tokens, offset, start)
            step_loss += loss / self.accum
            if a == 0 and self.uses_fam:
                next_rsp = state.fam_only(0)
        return step_loss, next_rsp

    def micro_batch(self, tokens: torch.Tensor, offset: torch.Tensor, start: FAMState | None):
        """Forward and backward of one micro-batch (tokens [b, s + 1]); returns (its loss, detached; its state)."""
        if self.micro_chunk_len:
            with self.autocast():  # forward and backward of every micro-chunk happen inside
                out = micro_chunked_forward_backward(self.model, tokens[:, :-1], tokens[:, 1:], self.micro_chunk_len,
                                                     start, offset, 1 / self.accum, self.truncated,
                                                     self.offload_states)
            return out.loss, out.state
        with self.autocast():
            out = self.model(tokens[:, :-1], labels=tokens[:, 1:], state=start, position_offset=offset,
                             return_logits=False)
        (out.loss / self.accum).backward()
        return out.loss.detach(), out.state

    def update(self, lr: float, skipped: bool) -> None:
        if not skipped:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def eval_losses(self, tokens: list[torch.Tensor]) -> list:
        if self.micro_chunk_len:  # streamed with the state, one micro-chunk's activations at a time
            return [micro_chunked_loss(self.model, t[:, :-1], t[:, 1:], self.micro_chunk_len) for t in tokens]
        return [self.model(t[:, :-1], labels=t[:, 1:], return_logits=False).loss for t in tokens]

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
        load_master_weights(self.state_dict(), state, self.optimizer)  # bf16-mixed: the fp32 values too

    def load_weights(self, weights: dict) -> None:
        """Global-named weights (another layout's checkpoint); megatron's _extra_state stays."""
        current = self.model.state_dict()
        self.model.load_state_dict({k: v if k.endswith("_extra_state") else weights[k] for k, v in current.items()})
        load_master_weights(self.state_dict(), weights, self.optimizer)

    def checkpoint_files(self) -> dict:
        if self.groups.dp_rank:  # DP replicas are identical: their rank 0 writes
            return {}
        rsp = None if self.rsp_state is None else self.rsp_state.to_dict()
        weights = with_master_weights(self.state_dict(), self.optimizer)  # bf16-mixed: the fp32 masters
        return {model_file(self.groups): {"model": weights, "rsp_state": rsp},
                optim_file(self.groups): self.optimizer.state_dict()}

    def restore(self, path: Path, trainer: dict) -> bool:
        if not same_layout(path, trainer, self.groups, self.chunks, can_reshard=True):
            weights, self.rsp_state = read_resharded(path, trainer, self.groups, local_fam_rows(self))
            self.load_weights(weights)
            return False
        shard = load_file(path, model_file(self.groups), map_location=self.groups.device)
        self.load_state_dict(shard["model"])
        self.optimizer.load_state_dict(load_file(path, optim_file(self.groups), map_location=self.groups.device))
        self.rsp_state = rsp_from_dict(shard["rsp_state"])
        return True


def local_fam_rows(step) -> int | None:
    """F rows of the hidden tensor on this rank (model/layer.py: F/tp under SP, else F), or None."""
    model = getattr(step, "model", None)
    modules = [model] if isinstance(model, torch.nn.Module) else [stage for _, stage in getattr(step, "stages", [])]
    return next((m.local_fam_rows for module in modules for m in module.modules() if hasattr(m, "local_fam_rows")),
                None)


class StagedModel:
    """What a layout with pipeline stages does differently, shared by PipelineStep and
    ZeroPipelineStep: `stages` [(global chunk index, FAMStage)] and `schedule` set by the layout."""

    stages: list
    schedule: object

    def state_dict(self) -> dict:
        return stage_state_dict(self.stages)  # global layer names: any pipeline split can load them

    def load_state_dict(self, state: dict) -> None:
        load_stage_state_dict(self.stages, state)
        load_master_weights(self.state_dict(), state, self.optimizer)

    load_weights = load_state_dict

    def schedule_step(self, batch: StepBatch, start: FAMState | None, run=pipeline_step):
        """The micro-batches through the schedule (`run`: pipeline_step, or ZeRO's); returns
        (the mean loss on every rank of the PP group, this rank's RSP state)."""
        tokens = torch.cat(batch.tokens)  # [accum x b, s + 1]: the schedule splits it back into the micro-batches
        inputs, labels, offsets, chunk_index = self.schedule_inputs(tokens, torch.cat(batch.offsets))
        with self.autocast():
            loss = run(self.schedule, self.stages, inputs, labels, offsets, None if start is None else start.layers,
                       chunk_index=chunk_index)
        return self.last_stage_value(loss), self.stage_rsp_state()

    def schedule_inputs(self, tokens: torch.Tensor, offsets: torch.Tensor):
        """(inputs, labels, offsets, chunk_index or None) of samples [n, s + 1]: with truncated
        micro-chunks each sample's chunks become micro-batches (stages.py split_micro_chunks)."""
        if not self.micro_chunk_len:
            return tokens[:, :-1], tokens[:, 1:], offsets, None
        return split_micro_chunks(tokens, offsets, self.micro_chunk_len, self.cfg.data.micro_batch_size)

    def last_stage_value(self, value: torch.Tensor | None) -> torch.Tensor:
        """A loss known on the last pipeline stage only, on every rank of the PP group."""
        out = torch.zeros((), device=self.groups.device) if value is None else value.detach().float().reshape(())
        return all_reduce_sum(out, self.groups.pp_group)

    def stage_rsp_state(self) -> FAMState | None:
        """The RSP state of this rank's layers (global layer index; other stages' layers None): the
        FAM of element 0 of the step's first micro-batch, as one process keeps."""
        if not self.uses_fam:
            return None
        layers = [LayerState(None) for _ in range(self.cfg.model.num_layers)]
        k = micro_chunks_per_sample(self.cfg)  # the first sample's last micro-chunk ends it
        for _, stage in self.stages:
            for index, state in zip(stage.part.layer_range, stage.forward_states[-self.accum * k + k - 1]):
                layers[index] = state
        return FAMState(layers).fam_only(0)

    def eval_losses(self, tokens: list[torch.Tensor]) -> list:
        """Forward-only pass of the micro-batches; their losses on the last stage, else []."""
        batch = torch.cat(tokens)
        for _, stage in self.stages:
            stage.initial_state, stage.carry = None, None  # no RSP in validation
        has_first = any(s.first for _, s in self.stages)
        has_last = any(s.last for _, s in self.stages)
        losses: list = []
        inputs, labels, offsets, chunk_index = self.schedule_inputs(batch, torch.zeros(batch.shape[0],
                                                                                        device=self.groups.device))
        args = (inputs, offsets) if chunk_index is None else (inputs, offsets, chunk_index)
        self.schedule.eval(*(args if has_first else ()), target=labels if has_last else None,
                           losses=losses if has_last else None)
        for _, stage in self.stages:
            stage.forward_states.clear()
        return losses


class PipelineStep(StagedModel, PlainStep):
    """This rank's pipeline stages (TP shards inside) under the schedule, no DeepSpeed."""

    @classmethod
    def build(cls, cfg: Config, groups: ProcessGroups, accum: int) -> PipelineStep:
        stages, schedule = build_pipeline_stages(cfg, groups, accum)
        model = torch.nn.ModuleList(stage for _, stage in stages)
        start_equal(model, groups)
        step = cls(cfg, groups, model, build_plain_optimizer(model, cfg, groups), accum)
        step.stages, step.schedule = stages, schedule
        return step

    def micro_batches(self, batch: StepBatch, start: FAMState | None) -> tuple[torch.Tensor, FAMState | None]:
        loss, next_rsp = self.schedule_step(batch, start)
        if isinstance(self.optimizer, MixedPrecisionOptimizer):
            self.optimizer.scale_grads(1.0 / self.accum)  # the schedule's mean, on the fp32 sums
        return loss, next_rsp
