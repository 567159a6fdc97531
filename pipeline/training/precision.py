"""Training precision (train.precision) and the bf16-mixed optimizer: bf16 weights in the model,
fp32 master weights, fp32 gradient accumulation and AdamW in fp32.

    precision = resolve_precision(cfg.train.precision, device)             # auto: bf16-mixed on GPU, fp32 on CPU
    optimizer = MixedPrecisionOptimizer(model, cfg.optim, device.type)   # precision == "bf16-mixed"

The three precisions of the plain and pipeline steps:
- `fp32`: fp32 weights, fp32 math (the CPU default and the oracle chain's precision).
- `bf16-autocast`: fp32 weights under torch.autocast; every GEMM casts its fp32 weight to bf16 at
  each use, forward and backward (issue 13's profile: about 880 conversion copies per fam-1b step).
- `bf16-mixed` (the GPU default): the model's parameters are bf16, so autocast's weight casts
  are no-ops. Autocast still runs, as the model's per-op policy: GEMMs in bf16, softmax, norms and
  the loss in fp32 (model/scan_step.py states the scan's). The optimizer keeps one fp32 master
  copy per parameter and its AdamW state in fp32, as megatron-core's
  Float16OptimizerWithFloat16Params (main_param / main_grad) and DeepSpeed's bf16 optimizer do.
  A post-accumulate-grad hook adds each micro-batch's bf16 gradient into the master's fp32
  gradient and frees the bf16 one, so micro-batches, the data-parallel average and clipping all
  run in fp32; within one backward, autograd sums a weight's uses in bf16, as megatron does without
  gradient_accumulation_fusion. After AdamW, the masters are rounded into the bf16 parameters.
  Checkpoints hold the fp32 masters under the model's names (`with_master_weights`), so resume is
  bitwise and every reader (resharding, whole_model, HF export) sees fp32 weights.

Under ZeRO (parallel.zero_stage >= 1) DeepSpeed owns the optimizer: `bf16-mixed` is its bf16 mode,
which keeps fp32 master weights and gradients the same way (pipeline/parallel/zero_config.py);
`bf16-autocast` is refused there (pipeline/config/rules.py check_precision, which lists PRECISIONS).
"""

from __future__ import annotations

import torch

from pipeline.config.tree import OptimConfig
from pipeline.training.optim import build_adamw


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision with `auto` made concrete: bf16-mixed on a GPU, fp32 on CPU."""
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return precision


class MixedPrecisionOptimizer:
    """AdamW over fp32 master copies of a bf16 model (see the module docstring). It stands where a
    torch optimizer stands in the plain and pipeline steps: `param_groups` (the LR), `step`,
    `zero_grad`, `state_dict`/`load_state_dict` (AdamW's, over the masters in parameter order).
    `masters` are what gradient averaging and clipping work on: fp32, `.grad` the fp32 sum."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, device_type: str):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.masters = [self._master_of(p) for p in self.params]
        self.buffers = [torch.zeros_like(m) for m in self.masters]  # the fp32 gradients, allocated once
        for p in self.params:
            p.data = p.data.to(torch.bfloat16)
        self.by_ptr = {p.data_ptr(): m for p, m in zip(self.params, self.masters)}
        self.optimizer = build_adamw([(name, m) for (name, _), m in zip(named, self.masters)], cfg, device_type)
        self.hooks = [p.register_post_accumulate_grad_hook(self._accumulate_hook(i)) for i, p in enumerate(self.params)]

    @property
    def param_groups(self) -> list[dict]:
        """AdamW's groups, read each time: its load_state_dict replaces the list (a copy taken at
        build time would take the LR and lose it after a resume)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:
        """AdamW's per-master state (step, exp_avg, exp_avg_sq), keyed by master."""
        return self.optimizer.state

    @staticmethod
    def _master_of(param: torch.nn.Parameter) -> torch.nn.Parameter:
        """An fp32 copy with the attributes gradient clipping reads (TP sharding)."""
        master = torch.nn.Parameter(param.detach().float().clone())
        master.tensor_model_parallel = getattr(param, "tensor_model_parallel", False)
        return master

    def _accumulate_hook(self, index: int):
        # The hook holds its master and buffer, not the optimizer: the autograd engine keeps the hook
        # alive from C++, where the garbage collector cannot see a cycle param -> hook -> optimizer ->
        # param, so such a cycle kept every dropped model and its optimizer on the GPU for good.
        master, buffer = self.masters[index], self.buffers[index]

        def hook(param: torch.nn.Parameter) -> None:
            if master.grad is None:  # the first micro-batch that reached it this step
                buffer.copy_(param.grad)
                master.grad = buffer
            else:
                buffer.add_(param.grad)  # fp32 += bf16, summed in fp32
            param.grad = None

        return hook

    def scale_grads(self, factor: float) -> None:
        """Multiply the fp32 gradients (the pipeline schedule's 1 / micro-batches, done here because
        the hook has taken the bf16 gradients it would have scaled)."""
        for master in self.masters:
            if master.grad is not None:
                master.grad.mul_(factor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No gradient this step: a parameter no micro-batch reaches is skipped by AdamW, as in fp32."""
        for master, param in zip(self.masters, self.params):
            master.grad = None
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the masters, then each bf16 parameter the master rounded to nearest."""
        self.optimizer.step()
        torch._foreach_copy_(self.params, self.masters)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------ checkpoints: the masters' values

    def with_masters(self, state: dict) -> dict:
        """`state` (a layout's state dict, whose parameter tensors share the bf16 parameters'
        storage) with every parameter replaced by its fp32 master; buffers as they are."""
        return {k: self.by_ptr.get(v.data_ptr(), v).detach() if isinstance(v, torch.Tensor) else v
                for k, v in state.items()}

    @torch.no_grad()
    def load_masters(self, state: dict, loaded: dict) -> None:
        """After the layout loaded `loaded` (fp32, cast into the bf16 parameters), the masters take
        the fp32 values themselves. `state`: the layout's state dict now (same keys)."""
        for key, value in state.items():
            master = self.by_ptr.get(value.data_ptr()) if isinstance(value, torch.Tensor) else None
            if master is not None:
                master.copy_(loaded[key])


def with_master_weights(state: dict, optimizer) -> dict:
    """The weights a checkpoint holds: the fp32 masters under bf16-mixed, else `state` itself."""
    return optimizer.with_masters(state) if isinstance(optimizer, MixedPrecisionOptimizer) else state


def load_master_weights(state: dict, loaded: dict, optimizer) -> None:
    """Under bf16-mixed, the masters take the loaded fp32 weights (the model has their bf16 rounding)."""
    if isinstance(optimizer, MixedPrecisionOptimizer):
        optimizer.load_masters(state, loaded)
