"""Make megatron-core 0.16.1's sequence-parallel communication run on a machine without CUDA.

Its gather / reduce-scatter buffers are allocated on `torch.cuda.current_device()`, which raises
where torch has no CUDA. Pointing that call at the CPU (only when CUDA is absent, so only calls
that would otherwise crash change) lets the same megatron code run on gloo in CI and on NCCL on
GPUs. Measured in ../shared/research/dependencies.md §2 ("patch A").
"""

from __future__ import annotations

import torch


def apply_cpu_compat() -> None:
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"
