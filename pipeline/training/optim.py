"""AdamW with decay/no-decay groups, the warmup + cosine LR schedule, and TP-aware clipping.

The schedule is a pure function of the step (`lr_at`), so the checkpointed step alone restores
it. Gradient norms follow megatron's rule: parameters sharded over tensor parallelism
(`tensor_model_parallel=True`) contribute their squared norms summed over the TP group;
replicated ones (norms, the FAM prompt) have identical grads on every TP rank and count once.
With pipeline parallelism each stage holds distinct parameters, so the per-stage totals are
summed over the PP group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pipeline.config.tree import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to lr, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm weights and biases (1-D) and the learned FAM prompt are not decayed: shrinking
    them towards zero changes what the layer computes, not just the weight scale. A ZeRO-3
    parameter built under zero.Init has an empty 1-D `.data`; its real shape is `ds_shape`."""
    return len(getattr(param, "ds_shape", param.shape)) < 2 or name.rsplit(".", 1)[-1] == "fam_prompt"


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    return build_adamw([(name, p) for name, p in model.named_parameters() if p.requires_grad], cfg, device_type)


def build_adamw(named_params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig,
                device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over (name, parameter) pairs: the model's, or bf16-mixed's fp32 masters under the
    same names (pipeline/training/precision.py)."""
    decay, no_decay = [], []
    for name, param in named_params:
        (no_decay if is_no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=device_type == "cuda",  # one kernel for all params on GPU; the CPU path is the reference
    )


def grad_norm(params: list[torch.nn.Parameter], tp_group: dist.ProcessGroup | None = None,
              pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global L2 norm of the gradients of the full (unsharded) model, identical on all TP and PP ranks."""
    grads = [(p.grad, getattr(p, "tensor_model_parallel", False)) for p in params if p.grad is not None]
    device = grads[0][0].device if grads else (params[0].device if params else torch.device("cpu"))
    return global_norm(grads, device, tp_group, pp_group)


def global_norm(tensors: list[tuple[torch.Tensor, bool]], device: torch.device,
                tp_group: dist.ProcessGroup | None = None, pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm over (tensor, sharded over TP) pairs of every TP and PP rank: the gradients' (above),
    or the weights' (benchmarks/parallel_parity.py's per-step checksum). Summed in fp32."""
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    for g, is_sharded in tensors:
        sq = g.detach().float().pow(2).sum()
        if is_sharded:
            sharded += sq
        else:
            replicated += sq
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    total = sharded + replicated
    if pp_group is not None and dist.get_world_size(pp_group) > 1:  # stages own distinct parameters
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grads(params: list[torch.nn.Parameter], max_norm: float, tp_group: dist.ProcessGroup | None = None,
               pp_group: dist.ProcessGroup | None = None) -> float:
    """Scale gradients so the global norm is at most `max_norm` (0: no clipping). Returns the
    norm before clipping."""
    norm = grad_norm(params, tp_group, pp_group)
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return float(norm)
