"""DeepSpeed ZeRO's configuration from famtron's (pipeline/parallel/zero_config.py): bad combinations
fail before any work, naming the numbers; clipping and batch sizes are set explicitly and overrides
merge; on CPU, DeepSpeed's shared-memory all-reduce is never built. No processes are spawned here:
tests/test_zero.py runs ZeRO itself against one process."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _config(**changes):
    from pipeline.config.load import load_config

    return load_config(None, [f"--{k.replace('__', '.')}={v}" for k, v in changes.items()])


def test_bad_zero_combinations_fail_naming_the_numbers():
    from pipeline.config.rules import check_zero
    from pipeline.parallel.zero_config import to_deepspeed_config

    for stage in (2, 3):
        with pytest.raises(ValueError, match=f"zero_stage={stage} with parallel.pipeline_parallel_size=2"):
            check_zero(stage, 2, False)
    with pytest.raises(ValueError, match=r"zero_stage=4: must be 0, 1, 2 or 3"):
        check_zero(4, 1, False)
    with pytest.raises(ValueError, match=r"zero_offload_optimizer=true with parallel.pipeline_parallel_size=2"):
        to_deepspeed_config(_config(parallel__zero_stage=1, parallel__pipeline_parallel_size=2,
                                    parallel__zero_offload_optimizer="true"), 2, False)
    with pytest.raises(ValueError, match=r"zero_stage=0: DeepSpeed runs ZeRO stages \(1, 2, 3\)"):
        to_deepspeed_config(_config(), 2, False)
    # With PP the schedule's micro-batches are the accumulation: the engine takes them as one batch.
    pp = to_deepspeed_config(_config(parallel__zero_stage=1, parallel__pipeline_parallel_size=2,
                                     data__micro_batch_size=2, data__global_batch_size=16), 2, False)
    assert pp["gradient_accumulation_steps"] == 1 and pp["train_micro_batch_size_per_gpu"] == 8
    check_zero(1, 4, False)  # ZeRO-1 with PP is fine


def test_deepspeed_config_sets_clipping_and_batch_sizes_and_merges_overrides():
    from pipeline.parallel.zero_config import to_deepspeed_config

    shape = dict(parallel__zero_stage=2, data__micro_batch_size=2, data__global_batch_size=24)
    cfg = to_deepspeed_config(_config(**shape, optim__grad_clip=0.0, parallel__zero_offload_optimizer="true"), 4,
                              bf16=True)
    assert cfg["gradient_clipping"] == 0.0  # explicit even when off: DeepSpeed's default is 1.0
    assert cfg["train_batch_size"] == 24 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["bf16"] == {"enabled": True} and cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"

    def with_overrides(overrides):
        c = _config(**shape)
        c.parallel.deepspeed_overrides = overrides
        return to_deepspeed_config(c, 4, False)

    merged = with_overrides({"zero_optimization": {"reduce_bucket_size": 1000}})
    assert merged["zero_optimization"]["stage"] == 2 and merged["zero_optimization"]["reduce_bucket_size"] == 1000
    with pytest.raises(ValueError, match=r"gradient_clipping=2.0 contradicts the derived 1.0; set optim.grad_clip"):
        with_overrides({"gradient_clipping": 2.0})
    with pytest.raises(ValueError, match=r"zero_optimization.stage=3 contradicts"):
        with_overrides({"zero_optimization": {"stage": 3}})


def test_zero_on_cpu_skips_deepspeeds_shared_memory_allreduce_build(monkeypatch):
    """pipeline/parallel/zero.py marks DeepSpeed's CPU shared-memory all-reduce (a JIT C++ build of
    about 60 s, used only by its inference all-reduce) unavailable: DeepSpeed's communication backend
    then builds nothing and uses the process group. The name must still be DeepSpeed's, or the
    mark would silently miss."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    from pipeline.parallel import zero

    assert zero.SHM_ALLREDUCE_OP == ShareMemCommBuilder.NAME
    # as DeepSpeed finds it on this machine
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, ShareMemCommBuilder.NAME, True)
    zero._use_cpu_accelerator_without_cuda()
    assert build_shm_op() is None
