"""The FFN: megatron-core's MLP (its fc1/fc2 linears, tensor-parallel layout and checkpoint keys)
with SwiGLU as one compiled kernel on CUDA.

megatron's MLP without its fused-activation path (which needs apex or a compile on every device,
CPU tests included) runs SwiGLU as eager ops: silu(gate), `up + glu_linear_offset` (an add of 0.0
over the whole [s, b, ffn] tensor), their product, and in backward two products, silu's backward
and a cat. Issue 13's operator profile of bswa-1b at 8k (benchmarks/results/2026-11-30-2xH200):
~24 ms of 186 per step in those ops over [8192, 1, 12288] tensors, and autograd keeps five
FFN-wide tensors per layer. Compiled, the forward is one kernel that reads fc1's output once, and
the backward one kernel that recomputes silu from it: three FFN-wide tensors kept instead of five
(pipeline/memory/terms.py, `swiglu`).

On CPU, and on CUDA with FUSED = False: megatron's own forward, unchanged, the oracle of the fused
one (tests/test_gpu.py, tests/test_fused_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_
from megatron.core.transformer.mlp import MLP

from model.compile_limits import bounded_compiles, compiled_pointwise

# On by default since it ran on an H200 (2026-11-30, benchmarks/results/2026-11-30-2xH200, with
# model/rope.py's; `benchmarks.train_step --eager-ops` turns both off): tokens/s +3-9 % from 32k
# tokens on, peak memory 7 GiB lower at 8k and 26-30 GiB at 32k; at 8k with micro-batch 1 the
# compiled calls' CPU time shows as idle GPU (fam-1b -5 %, bswa-1b and dense-1b -0.4 % / -2 %).
# Compiled for each length since (model/compile_limits.py STATIC_SHAPES): bswa-1b 41.2k -> 51.8k
# tokens/s at 8k, 1.04x the plain anchor.
FUSED = True


class FAMMLP(MLP):
    def __init__(self, config, submodules, **kwargs):
        super().__init__(config, submodules, **kwargs)
        if not (config.gated_linear_unit and config.activation_func is F_.silu and not config.add_bias_linear
                and config.glu_linear_offset == 0.0 and config.activation_func_clamp_value is None):
            raise ValueError("FAMMLP fuses bias-free SwiGLU only: gated_linear_unit=True, activation_func=silu, "
                             "add_bias_linear=False, no glu_linear_offset or clamp (model/config.py)")

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not (FUSED and hidden_states.is_cuda) or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, _ = self.linear_fc1(hidden_states)
        with bounded_compiles("SwiGLU (model/mlp.py)"):
            intermediate = _compiled_swiglu()(intermediate)
        return self.linear_fc2(intermediate)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over fc1's output [..., 2 * ffn]: [gate | up] on each TP rank (megatron's
    stride-2 fc1 layout)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F_.silu(gate) * up


def _compiled_swiglu():
    return compiled_pointwise(swiglu)  # shapes: model/compile_limits.py STATIC_SHAPES
