"""Initial weights that depend only on (seed, parameter name), never on the parallel layout.

Each parameter is drawn whole (its TP=1 shape) from a generator seeded by the seed and its global
name (`layers.17.mlp.linear_fc1.weight`), then cut to this rank's TP shard (model/weights.py).
So a pipeline stage initialises its own layers without building the others, and TP=1, TP=2,
PP=1, PP=8 and ZeRO-3's partitioned build all start from the same model: what makes the parallel
runs comparable to one process, and a 24B model buildable one stage per GPU.

    norms                      ones
    linear_proj, linear_fc2    N(0, std / sqrt(2 L))   (megatron's scaled init of output layers)
    every other matrix         N(0, std)               (embedding, QKV, FC1, output layer, FAM prompt)

The numbers come from the parameter's own device's generator (CPU and CUDA streams differ).
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch

from model.config import ModelArgs
from model.weights import shard_megatron_state


def name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def draw(name: str, shape: tuple[int, ...], std: float, num_layers: int, seed: int, device="cpu",
         dtype=torch.float32) -> torch.Tensor:
    """The whole initial value of parameter `name`."""
    if len(shape) == 1:
        return torch.ones(shape, device=device, dtype=dtype)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2 * num_layers)
    gen = torch.Generator(device=device).manual_seed(name_seed(seed, name))
    return torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


def init_parameters_(module: torch.nn.Module, args: ModelArgs, seed: int, tp_rank: int = 0, tp_size: int = 1,
                     global_name=lambda name: name) -> None:
    """Overwrite every parameter of `module` (a FAMLanguageModel or a pipeline part of one) with
    its layout-independent initial value. `global_name` maps the module's parameter names to the
    whole model's (a pipeline part numbers its layers from 0). ZeRO-3 parameters (built under
    deepspeed.zero.Init, partitioned) are gathered one at a time and written from DP rank 0."""
    shapes = args.parameter_shapes()
    for name, param in module.named_parameters():
        full_name = global_name(name)
        if full_name not in shapes:
            raise KeyError(f"parameter {name} (global {full_name}) is not one of the model's: {sorted(shapes)[:4]}...")
        with _whole(param):
            full = draw(full_name, shapes[full_name], args.init_method_std, args.num_layers, seed, param.device)
            value = shard_megatron_state({full_name: full}, tp_rank, tp_size)[full_name]
            if value.shape != param.shape:
                raise ValueError(f"{full_name}: initial shard {tuple(value.shape)} vs parameter {tuple(param.shape)} "
                                 f"(TP rank {tp_rank} of {tp_size})")
            with torch.no_grad():
                param.copy_(value)


def _whole(param: torch.nn.Parameter):
    """The whole parameter inside the context: ZeRO-3's gather (written back from rank 0 on exit)."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
