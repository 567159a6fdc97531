"""DeepSpeed ZeRO for the FAM model on famtron's process groups.

    with build_zero3_init(ds_config, mpu):                          # only with zero_stage=3: built
        model = build_model(...)                                     # already partitioned
    engine = build_zero_engine(ZeroModule(model), build_optimizer(model, cfg.optim), ds_config, mpu)
    result = zero_train_step(engine, micro_batches, lr=lr)          # PP = 1: ZeRO-1/2/3
    loss = zero_pipeline_step(engine, schedule, stages, tokens, labels, offsets, lr=lr)  # PP > 1: ZeRO-1

`ds_config` is pipeline/parallel/zero_config.py's to_deepspeed_config, `mpu` a MegatronMPU over
the run's groups (pipeline/parallel/mpu.py). Where the data-parallel optimizer lives: DeepSpeed
partitions optimizer state (ZeRO-1), plus gradients (ZeRO-2), plus parameters (ZeRO-3) over the
data-parallel group; tensor and pipeline parallelism stay megatron's layers on famtron's groups.
Parameters marked `tensor_model_parallel=True` count in the global gradient norm on every TP
rank, the replicated ones (norms, the FAM prompt) on TP rank 0 only, like
pipeline/training/optim.py's `grad_norm`.

Precision: fp32 everywhere on CPU; with bf16 the module runs in bf16 and ZeRO keeps fp32 master
weights and optimizer state (never ZeRO-0 with bf16: it has no fp32 master copy).

Pipeline parallelism: torch.distributed.pipelining's schedule runs forward and backward itself,
outside the engine, so `zero_pipeline_step` does afterwards what `engine.backward` does at an
accumulation boundary (`engine.allreduce_gradients()`: ZeRO-1's bucketed reduce into this rank's
gradient partition) and then `engine.step()`. The schedule's micro-batches are the accumulation,
so the engine runs with gradient_accumulation_steps=1 and every step is a boundary. ZeRO-2/3 hook
into each backward (gradient partitioning, parameter gathering) and are refused with PP > 1.
Checkpoints: pipeline/checkpointing/zero_files.py.

Non-finite steps (pipeline/training/fault.py NonFiniteGuard): the engine updates inside `engine.step()`,
before the training loop sees the loss. DeepSpeed 0.19.8 discards an update itself when the
global gradient norm is NaN/inf (ZeRO-1/2 `step`, fp32 and bf16 with `bf16.check_grad_overflow`;
ZeRO-3 always): it clears the gradients and its reduce buffers, leaves weights and AdamW state
untouched, reports the norm as inf and counts `engine.skipped_steps`. A NaN/inf loss need not
make the gradients non-finite, so a rank whose loss is not finite turns its gradients into NaN
before they are reduced (`_nan_unless_finite` for PP = 1; the stage gradients for PP > 1): then
DeepSpeed skips exactly the steps the guard skips (loss or norm not finite). Overrides that would
turn DeepSpeed's check off are refused (zero_config.py NONFINITE_CHECK_KEYS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.parallel.mpu import MegatronMPU


class ZeroModule(torch.nn.Module):
    """What the engine wraps: the whole model (PP = 1) or this rank's pipeline stages (PP > 1).
    forward returns (loss, ModelOutput): DeepSpeed hooks the backward through the tensors it finds
    in tuples, lists and dicts, not in a dataclass. `plain_names` maps parameter names to the plain
    model's (global layer indices), which consolidated checkpoints use."""

    def __init__(self, model: torch.nn.Module | None = None, stages: list | None = None):
        super().__init__()
        if (model is None) == (stages is None):
            raise ValueError("ZeroModule takes either model= (PP = 1) or stages= (PP > 1)")
        self.model = model
        self.stages = None if stages is None else torch.nn.ModuleList(stage for _, stage in stages)

    def forward(self, *args, **kwargs):
        if self.model is None:
            raise RuntimeError("with pipeline stages the schedule runs forward: use zero_pipeline_step")
        out = self.model(*args, **kwargs)
        return out.loss, out

    def plain_names(self) -> dict[str, str]:
        """{name in this module's state_dict: name in the plain FAMLanguageModel's state_dict}."""
        if self.model is not None:
            return {name: name[len("model."):] for name in self.state_dict()}
        out = {}
        for i, stage in enumerate(self.stages):
            for name in stage.part.state_dict():
                plain = name
                if name.startswith("layers."):
                    local, rest = name[len("layers."):].split(".", 1)
                    plain = f"layers.{stage.part.layer_range[int(local)]}.{rest}"
                out[f"stages.{i}.part.{name}"] = plain
        return out


def build_zero_engine(module: ZeroModule, optimizer: torch.optim.Optimizer, ds_config: dict, mpu: MegatronMPU):
    """deepspeed.initialize on the run's groups (pipeline/parallel/groups.py start_groups first).
    The engine broadcasts parameters from DP rank 0 of each group."""
    _use_cpu_accelerator_without_cuda()
    import deepspeed

    if ds_config["zero_optimization"]["stage"] == 3:
        apply_zero3_external_parameters(module)
    if not dist.is_initialized():
        raise RuntimeError("build_zero_engine needs torch.distributed: pipeline.parallel.groups.start_groups first")
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, mpu=mpu,
                                      dist_init_required=False)
    return engine


def build_zero3_init(ds_config: dict, mpu: MegatronMPU):
    """The context to construct a model in under ZeRO-3: each module's parameters are
    partitioned over the data-parallel group as soon as its __init__ returns, so no rank ever
    holds the whole fp32 model (fam-24b: ~100 GB) on its GPU or in host memory; at most one
    module's full weight exists at a time (the 256k x 4096 embedding). Inside it, new floating
    tensors take the engine's dtype (bf16 with bf16, else fp32) and, when no device is named,
    DeepSpeed's device. build_model then draws each parameter by name (model/init.py), gathered
    one at a time and written from DP rank 0: fp32 weights are the plain build's bit for bit
    (tests/test_zero_offload.py); under bf16 the draw may be rounded to bf16 first, so they need
    not equal a plain fp32 build cast to bf16. `ds_config` must be the dict the engine gets."""
    _use_cpu_accelerator_without_cuda()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # As deepspeed.initialize does; before it, DeepSpeed's config sees no ranks and checks the
    # batch sizes against a data-parallel size of 1.
    deepspeed.init_distributed(get_accelerator().communication_backend_name(), dist_init_required=False)
    return deepspeed.zero.Init(data_parallel_group=mpu.get_data_parallel_group(), config_dict_or_path=ds_config,
                               mpu=mpu)


def _use_cpu_accelerator_without_cuda() -> None:
    """Without CUDA, DeepSpeed's CPU accelerator. Its communication backend would JIT-compile a
    shared-memory all-reduce at its first start (C++ with OpenMP: about 60 s on 2 cores, once per
    machine and environment), which only DeepSpeed's inference all-reduce uses; ZeRO's collectives
    run on torch.distributed (gloo) either way. So the op is marked unavailable, and DeepSpeed
    falls back to the process group, as it does where the op does not build."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_ALLREDUCE_OP] = False


SHM_ALLREDUCE_OP = "deepspeed_shm_comm"  # deepspeed/ops/op_builder/cpu/comm.py ShareMemCommBuilder.NAME


def apply_zero3_external_parameters(module: torch.nn.Module) -> None:
    """Tell ZeRO-3 about weights used outside their owner's forward; it gathers a parameter only
    around its owner's forward and backward, found through the owner's output tensors.
    * FAMLayer's block scan (model/scan.py) calls its norms' and linears' weights functionally:
      each layer gathers all of its weights for the whole layer.
    * FAMLanguageModel returns a ModelOutput dataclass, whose tensors ZeRO-3 cannot see, so its own
      parameters (the FAM prompt) would not be gathered when their gradient arrives: the top
      module (whose output is a tuple) holds them for the whole backward.
    * The chunked loss (FAMLanguageModel.lm_loss, return_logits=False) uses the output layer's
      weight outside that layer's forward: the top module holds it too."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    from model.language_model import FAMLanguageModel
    from model.layer import FAMLayer

    for sub in module.modules():
        if isinstance(sub, FAMLayer):
            for param in sub.parameters():
                register_external_parameter(sub, param)
        elif isinstance(sub, FAMLanguageModel):
            for param in sub.parameters(recurse=False):
                register_external_parameter(module, param)
            if sub.post_process:
                register_external_parameter(module, sub.output_layer.weight)


def set_engine_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@dataclass
class ZeroStepResult:
    loss: torch.Tensor  # mean loss over this rank's micro-batches (detached)
    grad_norm: float | None  # global pre-clip gradient norm (None if DeepSpeed did not compute one)
    first_output: Any  # ModelOutput of the first micro-batch (its state feeds RSP)


def zero_train_step(engine, micro_batches: list[dict], lr: float | None = None) -> ZeroStepResult:
    """One optimizer step with PP = 1: engine(...) / engine.backward / engine.step per micro-batch
    (DeepSpeed reduces and steps at the accumulation boundary it counts itself). Each item of
    `micro_batches` holds the model's keyword arguments (tokens, labels, state, position_offset)."""
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(
            f"{len(micro_batches)} micro-batches for an engine with gradient_accumulation_steps="
            f"{engine.gradient_accumulation_steps()}"
        )
    if lr is not None:
        set_engine_lr(engine, lr)
    total, first = 0.0, None
    for batch in micro_batches:
        loss, out = engine(**batch)
        engine.backward(_nan_unless_finite(loss))
        engine.step()
        total = total + loss.detach().float()  # stays on the device: no sync per micro-batch
        first = out if first is None else first
    return ZeroStepResult(total / len(micro_batches), grad_norm_of(engine), first)


def zero_pipeline_step(engine, schedule, stages, tokens, labels, offsets, initial_state=None, lr: float | None = None):
    """One optimizer step with PP > 1 and ZeRO-1: the schedule's forward/backward, then what
    engine.backward does at the accumulation boundary, then engine.step(). Returns the mean loss on
    ranks with the last stage, else None (as pipeline_step)."""
    from pipeline.parallel.stages import pipeline_step

    return zero_step_after_backward(engine, lambda: pipeline_step(schedule, stages, tokens, labels, offsets,
                                                                  initial_state), lr)


def zero_step_after_backward(engine, forward_backward, lr: float | None = None):
    """One ZeRO-1 optimizer step whose forward and backward run outside the engine:
    `forward_backward()` (the pipeline schedule, or a sample's micro-chunks: several backward
    calls, accumulating into p.grad) returns the loss (None on ranks without one); then what
    engine.backward does at the accumulation boundary, then engine.step(). Returns the loss."""
    if engine.zero_optimization_stage() != 1 or engine.gradient_accumulation_steps() != 1:
        raise ValueError(
            f"a backward outside DeepSpeed needs ZeRO-1 with gradient_accumulation_steps=1, got stage "
            f"{engine.zero_optimization_stage()} with {engine.gradient_accumulation_steps()}"
        )
    if lr is not None:
        set_engine_lr(engine, lr)
    engine.optimizer.clear_backward_seen_flag()  # what engine.forward does before a new backward
    loss = forward_backward()
    if loss is not None and not bool(torch.isfinite(loss)):  # its gradients are still p.grad
        for param in engine.module.parameters():
            if param.grad is not None:
                param.grad.fill_(float("nan"))  # the global norm (over DP, TP and PP) turns NaN: DeepSpeed skips
    engine.allreduce_gradients()  # the boundary reduce: DP-average into this rank's ZeRO-1 partition
    engine.step()
    return loss


def _nan_unless_finite(loss: torch.Tensor) -> torch.Tensor:
    """The loss to backward: itself (times exactly 1) when finite, else times NaN, so that its
    gradients are NaN and DeepSpeed's norm check discards the step. No device sync."""
    scale = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
    return loss * scale


def grad_norm_of(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """This TP rank's (and, with PP, this stage's) parameters in full, from ZeRO's fp32 master
    copies, under the plain model's names. Collective over the data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param

    names = engine.module.plain_names()
    out = {}
    for name, param in engine.module.named_parameters():
        out[names[name]] = safe_get_full_fp32_param(param).detach().cpu().clone()
    return out
