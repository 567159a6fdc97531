"""The per-layout pieces of the training step: pipeline stages and schedule, the DeepSpeed ZeRO
engine, and the forward/backward of one step under each (pipeline/train.py composes them).

With pipeline parallelism the step's accum micro-batches go through one torch.distributed.pipelining
schedule (which scales gradients by 1 / accum) and the loss lives on the last stage; with ZeRO,
DeepSpeed reduces, clips and steps. `tr` is pipeline.train.Trainer.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from model import FAMState, LayerState
from pipeline import config as config_lib
from pipeline.distributed import Ranks, all_reduce_sum
from pipeline.pipeline_parallel import build_initialised_stages, build_schedule, pipeline_step

if TYPE_CHECKING:
    from pipeline.train import Trainer


def build_pipeline(cfg: config_lib.Config, ranks: Ranks, accum: int, device: torch.device):
    """This rank's stages, built and initialised alone (model/init.py: the whole model's values,
    so PP = 2 starts from PP = 1's weights without any rank holding more than its layers), and the
    schedule over them; the step's accum x micro_batch_size sequences are its accum micro-batches."""
    p = cfg.parallel
    stages = build_initialised_stages(cfg.model, ranks.pp_rank, ranks.pp_size, cfg.train.seed, device, ranks.tp_rank,
                                      ranks.tp_size, p.virtual_stages, p.pipeline_layout, p.sequence_parallel)
    return stages, build_schedule(stages, ranks.pp_size, accum, p.pipeline_schedule, ranks.pp_group, device)


def engine_config(cfg: config_lib.Config, ranks: Ranks, accum: int, use_bf16: bool) -> dict:
    """The DeepSpeed JSON of this run. With PP the schedule's micro-batches are the accumulation,
    so the engine sees one batch of accum x micro_batch_size per step."""
    from pipeline.zero import to_deepspeed_config

    p, d = cfg.parallel, cfg.data
    pp = p.pipeline_parallel_size > 1
    return to_deepspeed_config(
        p.zero_stage, d.micro_batch_size * (accum if pp else 1), 1 if pp else accum, cfg.optim.grad_clip, use_bf16,
        p.zero_offload_optimizer, ranks.dp_size, p.deepspeed_overrides, p.pipeline_parallel_size)


def model_init_context(cfg: config_lib.Config, ranks: Ranks, accum: int, use_bf16: bool):
    """Where build_model runs: under ZeRO-3, DeepSpeed's zero.Init (parameters partitioned as
    they are made, pipeline/zero.py build_zero3_init); otherwise nothing special."""
    if cfg.parallel.zero_stage != 3:
        return contextlib.nullcontext()
    from pipeline.zero import build_zero3_init

    return build_zero3_init(engine_config(cfg, ranks, accum, use_bf16))


def build_engine(cfg: config_lib.Config, ranks: Ranks, model, stages, optimizer, accum: int, use_bf16: bool):
    """DeepSpeed ZeRO over megatron's groups, wrapping the whole model (PP = 1) or this rank's stages."""
    from pipeline.zero import ZeroModule, build_zero_engine

    module = ZeroModule(stages=stages) if stages else ZeroModule(model=model)
    return build_zero_engine(module, optimizer, engine_config(cfg, ranks, accum, use_bf16))


def pipeline_forward_backward(tr: Trainer, tokens: list, offsets: list,
                              start_state) -> tuple[torch.Tensor, FAMState | None]:
    """The micro-batches through the pipeline schedule (it scales gradients by 1 / accum)."""
    batch = torch.cat(tokens)  # [accum x b, s + 1]: the schedule splits it back into the micro-batches
    with tr.autocast():
        loss = pipeline_step(tr.schedule, tr.stages, batch[:, :-1], batch[:, 1:], torch.cat(offsets),
                             None if start_state is None else start_state.layers)
    return last_stage_value(tr, loss), stage_rsp_state(tr)


def zero_forward_backward_step(tr: Trainer, tokens: list, offsets: list, start_state, lr: float):
    """One ZeRO step (DeepSpeed reduces, clips at optim.grad_clip and steps); returns (loss, grad norm, RSP state)."""
    from pipeline.zero import _grad_norm, zero_pipeline_step, zero_train_step

    if tr.stages:
        batch = torch.cat(tokens)
        with tr.autocast():
            loss = zero_pipeline_step(tr.engine, tr.schedule, tr.stages, batch[:, :-1], batch[:, 1:],
                                      torch.cat(offsets), None if start_state is None else start_state.layers, lr=lr)
        return last_stage_value(tr, loss), _grad_norm(tr.engine), stage_rsp_state(tr)
    micro_batches = [{"tokens": b[:, :-1], "labels": b[:, 1:], "state": start_state, "position_offset": o,
                      "return_logits": False} for b, o in zip(tokens, offsets)]
    # No outer autocast: DeepSpeed's bf16 runs the module in bf16 itself, and its engine turns an
    # outer autocast off inside its forward anyway (with a warning).
    result = zero_train_step(tr.engine, micro_batches, lr=lr)
    next_rsp = result.first_output.state.fam_only(0) if tr.cfg.model.uses_fam else None
    return result.loss, result.grad_norm, next_rsp


def last_stage_value(tr: Trainer, value: torch.Tensor | None) -> torch.Tensor:
    """A loss known on the last pipeline stage only, on every rank of the PP group."""
    out = torch.zeros((), device=tr.device) if value is None else value.detach().float().reshape(())
    return all_reduce_sum(out, tr.ranks.pp_group)


def stage_rsp_state(tr: Trainer) -> FAMState | None:
    """The RSP state of this rank's layers (global layer index; other stages' layers None): the
    FAM of element 0 of the step's first micro-batch, as one process saves."""
    if not tr.cfg.model.uses_fam:
        return None
    layers = [LayerState(None) for _ in range(tr.cfg.model.num_layers)]
    for _, stage in tr.stages:
        for index, state in zip(stage.part.layer_range, stage.forward_states[-tr.accum]):
            layers[index] = state
    return FAMState(layers).fam_only(0)


def clear_forward_states(tr: Trainer) -> None:
    for _, stage in tr.stages:
        stage.forward_states.clear()


def pipeline_eval(tr: Trainer, tokens: torch.Tensor) -> list:
    """Forward-only pass of accum micro-batches; the micro-batch losses on the last stage, else []."""
    for _, stage in tr.stages:
        stage.initial_state = None  # no RSP in validation
    has_first = any(s.first for _, s in tr.stages)
    has_last = any(s.last for _, s in tr.stages)
    losses: list = []
    offsets = torch.zeros(tokens.shape[0], device=tr.device)
    tr.schedule.eval(*((tokens[:, :-1], offsets) if has_first else ()), target=tokens[:, 1:] if has_last else None,
                     losses=losses if has_last else None)
    clear_forward_states(tr)
    return losses
