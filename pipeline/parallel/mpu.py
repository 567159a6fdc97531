"""The `mpu` DeepSpeed asks for, over the process groups of pipeline/parallel/groups.py.

Its "model-parallel" group is the TP x PP group, so DeepSpeed sums gradient norms and checks
overflow over every stage and TP shard, and names its checkpoint files by the rank in it (unique
per TP x PP coordinate). megatron-core's `parallel_state` module lacks
`get_model_parallel_rank/world_size`, which DeepSpeed calls, so it cannot serve directly.
"""

from __future__ import annotations

import torch.distributed as dist

from pipeline.parallel.groups import ProcessGroups


class MegatronMPU:
    """The `mpu` DeepSpeed asks for, over megatron-core's groups. megatron-core's `parallel_state`
    module itself lacks `get_model_parallel_rank/world_size`, which DeepSpeed calls.
    Model parallel = megatron's TP x PP group: DeepSpeed sums gradient norms and checks overflow
    over it and names checkpoint files by its rank (unique per TP x PP coordinate)."""

    def __init__(self, tp_group, pp_group, dp_group, mp_group):
        self._tp, self._pp, self._dp, self._mp = tp_group, pp_group, dp_group, mp_group

    @classmethod
    def from_groups(cls, groups: ProcessGroups) -> MegatronMPU:
        return cls(groups.tp_group, groups.pp_group, groups.dp_group, groups.mp_group)

    def get_model_parallel_group(self):
        return self._mp

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self._mp)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._mp)

    def get_tensor_model_parallel_group(self):
        return self._tp

    def get_tensor_model_parallel_rank(self) -> int:
        return dist.get_rank(self._tp)

    def get_tensor_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._tp)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_process_group_ranks(self._tp)[0]

    def get_pipeline_model_parallel_group(self):
        return self._pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return dist.get_rank(self._pp)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self._pp)

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._dp)
