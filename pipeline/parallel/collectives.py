"""The collectives of the training step: data-parallel gradient averaging, broadcasts, reductions,
barriers and the peak-memory gather. All work with a 1-process group or without torch.distributed.

Groups come from pipeline/parallel/groups.py's ProcessGroups; the functions take them as
arguments rather than reaching for globals.
"""

from __future__ import annotations

import resource
import socket
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist


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
