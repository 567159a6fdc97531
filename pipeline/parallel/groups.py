"""Process groups, started in one place and handed to whatever needs one.

    groups = start_groups(tensor_parallel_size=2, pipeline_parallel_size=1)   # backend, timeout, device
    model = build_model(args, tp_group=groups.tp_group, device=groups.device)
    ...
    stop_groups()

Under a launcher (torchrun sets RANK and WORLD_SIZE): torch.distributed from env:// with
`timeout_seconds` on every collective, so a hung or dead peer raises instead of blocking for
torch's 30-minute default. One process: the same world of size 1 over an in-memory HashStore.
Then megatron-core's groups (`initialize_model_parallel`: TP ranks adjacent, then DP, then PP;
the same timeout), whose TP, PP, DP and TP x PP ("model parallel") groups the returned
`ProcessGroups` holds with this rank's coordinates, device and backend.

Nothing reads megatron's global groups afterwards: model/ gets the TP group passed down
(model/groups.py), DeepSpeed a MegatronMPU over these groups (pipeline/parallel/mpu.py), the
training step its DP, TP and PP groups. Megatron's parallel state exists because its
sequence-parallel linears take their all-gather buffer from it (`get_global_memory_buffer`).
Backend `auto`: gloo on CPU; with CUDA, NCCL for CUDA tensors and gloo for CPU ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroups:
    """This process's coordinates and groups. `dp_*`: data, `tp_*`: tensor, `pp_*`: pipeline
    parallel; `mp_group`: TP x PP (DeepSpeed's "model parallel" group). Without groups (None, the
    default) a collective helper treats the group as this one process."""

    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_group: Any = None
    tp_group: Any = None
    pp_group: Any = None
    mp_group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def launch_world_size() -> int:
    """World size from the launcher (torchrun sets WORLD_SIZE), before any group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def select_device(device: str) -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK under torchrun) when CUDA exists, else CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device=cuda but torch sees no CUDA device; use train.device=cpu or auto")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def choose_backend(backend: str) -> str:
    """parallel.backend: `auto` is gloo on CPU, NCCL for CUDA tensors plus gloo for CPU ones on GPU."""
    if backend != "auto":
        return backend
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def start_groups(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, backend: str = "auto",
                 timeout_seconds: float = 600.0, device: str = "auto") -> ProcessGroups:
    """torch.distributed's world (unless one exists) and megatron's groups (unless they exist with
    these sizes); see the module docstring."""
    from megatron.core import parallel_state

    place = select_device(device)
    backend = choose_backend(backend)
    timeout = timedelta(seconds=timeout_seconds)
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        # megatron builds `timedelta(minutes=...)`, which takes fractions: sub-minute timeouts work.
        parallel_state.initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size,
                                                 distributed_timeout_minutes=timeout_seconds / 60)
    ps = parallel_state
    now = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if now != (tensor_parallel_size, pipeline_parallel_size):
        raise ValueError(f"process groups of TP={now[0]} x PP={now[1]} exist already in this process; stop_groups() "
                         f"before starting TP={tensor_parallel_size} x PP={pipeline_parallel_size}")
    return ProcessGroups(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=now[0],
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=now[1],
        dp_group=ps.get_data_parallel_group(), tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(), mp_group=ps.get_model_parallel_group(),
        device=place, backend=backend,
    )


def stop_groups() -> None:
    """Undo start_groups: megatron's groups, then torch.distributed's world."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
