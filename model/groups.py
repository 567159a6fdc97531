"""The tensor-parallel group of a model built without one (the Python API, tests, tools).

model/ starts no parallel process groups. A launcher makes the TP, PP and DP groups in one place
(pipeline/parallel/groups.py) and passes the TP group down: `build_model(..., tp_group=...)`
hands it to the embedding, every layer's attention and MLP linears, the FAM scan's mappings, the
sequence-parallel norm hook, the output layer and the loss, none of which reads megatron's global
groups (docs/fam.md, "Process groups").

Without a launcher (`build_model("tiny")`) the TP group is this process alone. A standalone
`ProcessGroupGloo` over a HashStore would do, but megatron-core 0.16.1 drops any group it is
given while torch.distributed has no world (`megatron.core.utils.get_tensor_model_parallel_group_if_none`
returns None then), and its layers fail on the first forward. So `single_process_group` makes
torch.distributed's world of this one process (gloo over an in-memory HashStore: no network, no
environment variables, no megatron parallel state) when no world exists yet, and returns it. In a
world of several processes it refuses to guess which group a model should use.
"""

from __future__ import annotations

import torch.distributed as dist


def single_process_group() -> dist.ProcessGroup:
    """The world of this one process (made if torch.distributed has none) as a TP group of size 1."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ValueError(
            f"torch.distributed holds {dist.get_world_size()} processes: pass the model's tensor-parallel group, "
            "tp_group=start_groups(...).tp_group (pipeline/parallel/groups.py); model/ never guesses one"
        )
    return dist.group.WORLD
