"""Process-group helpers for the training loop: ranks, data-parallel gradient averaging,
broadcasts and barriers. All work with a 1-process group or without torch.distributed.

Groups come from megatron-core's `parallel_state` (initialised by `model.init_parallel`);
the functions take them as arguments rather than reaching for globals.
"""

from __future__ import annotations

import os
import resource
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's coordinates. `dp_*`: data parallel, `tp_*`: tensor, `pp_*`: pipeline parallel."""

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

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def build_ranks() -> Ranks:
    """Ranks and groups from megatron's parallel_state (after model.init_parallel)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return Ranks()
    return Ranks(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
    )


def destroy_parallel() -> None:
    """Undo model.init_parallel: megatron's groups, then torch.distributed's."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


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


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def group_size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def average_gradients(params: list[torch.nn.Parameter], dp_group: Any) -> None:
    """Average gradients over the data-parallel group with one coalesced all-reduce per dtype.
    A fixed bucket order and a plain sum keep it deterministic run to run."""
    size = group_size(dp_group)
    if size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        # A parameter without a gradient is skipped, not zero-filled: AdamW would otherwise move
        # it by its momentum, unlike a single process. Every rank runs the same code path (the
        # RSP coin is shared), so all ranks skip the same parameters and the layouts match.
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=dp_group)
        flat.div_(size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def group_src(group: Any) -> int:
    """Global rank of the first member of `group` (the usual broadcast source)."""
    return dist.get_process_group_ranks(group)[0] if group is not None else 0


def broadcast_tensors(tensors: list[torch.Tensor], group: Any) -> None:
    """In place, from the group's first rank (e.g. dp_rank 0) to the others."""
    if group_size(group) == 1:
        return
    src = group_src(group)
    for t in tensors:
        dist.broadcast(t, src=src, group=group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """A picklable object from global rank `src` to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: torch.Tensor, group: Any) -> torch.Tensor:
    size = group_size(group)
    if size > 1:
        values = values.clone()
        dist.all_reduce(values, group=group)
        values /= size
    return values


def all_reduce_sum(values: torch.Tensor, group: Any) -> torch.Tensor:
    if group_size(group) > 1:
        values = values.clone()
        dist.all_reduce(values, group=group)
    return values


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Collective over all ranks. In GiB: `peak_gpu_gib`, the largest torch.cuda.max_memory_allocated
    of any rank (None on CPU); `peak_host_gib`, the largest peak RSS of any rank process;
    `peak_host_node_gib`, the peak RSS summed over the ranks of a host, the largest host's sum.
    That sum bounds the host's need from above (the ranks need not peak at the same moment); it
    is the number to hold against a node's RAM when the optimizer is offloaded (ZeRO-Offload)."""
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    mine = (socket.gethostname(), gpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    per_host: Counter = Counter()
    for host, _, rss in everyone:
        per_host[host] += rss
    gpus = [g for _, g, _ in everyone if g is not None]
    gib = 2**30
    return {"peak_gpu_gib": max(gpus) / gib if gpus else None, "peak_host_gib": max(r for *_, r in everyone) / gib,
            "peak_host_node_gib": max(per_host.values()) / gib}
