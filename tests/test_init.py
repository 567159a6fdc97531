"""Initial weights depend on the seed and each parameter's name only (model/init.py): TP=2's
shards merge into TP=1's model bit for bit, and a pipeline stage built alone holds exactly the
whole model's values for its layers, and nothing else."""

from __future__ import annotations

import math

import pytest
import torch

from tests.spawn import run_on_ranks
from tests.test_reference import small_args

ARGS = dict(num_layers=4, num_attention_heads=4, num_query_groups=2, hidden_size=32, ffn_multiplier=2)


@pytest.fixture(autouse=True, scope="module")
def _leave_no_process_group():
    """build_model starts a one-process group here; later tests start their own."""
    yield
    from pipeline.parallel.groups import stop_groups

    stop_groups()


def _whole_model(seed: int = 7) -> dict[str, torch.Tensor]:
    from model import build_model

    model = build_model(small_args(**ARGS), device="cpu", seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _tp_worker(rank: int, world_size: int) -> dict | None:
    import torch.distributed as dist

    from model import build_model
    from pipeline.parallel.groups import start_groups, stop_groups

    groups = start_groups(tensor_parallel_size=world_size)
    model = build_model(small_args(**ARGS), device="cpu", seed=7, tp_group=groups.tp_group)
    shard = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    shards = [None] * world_size
    dist.all_gather_object(shards, shard)
    stop_groups()
    return shards if rank == 0 else None


def test_tp2_shards_merge_into_the_tp1_model():
    from model.weights import merge_megatron_shards

    shards = run_on_ranks(_tp_worker, 2)[0]  # numpy: tensors do not survive the worker's exit
    merged = merge_megatron_shards([{k: torch.from_numpy(v) for k, v in shard.items()} for shard in shards])
    whole = _whole_model()
    assert merged.keys() == whole.keys()
    for name, value in whole.items():
        assert torch.equal(merged[name], value), name


def test_a_pipeline_stage_built_alone_holds_the_whole_models_values_for_its_layers():
    from pipeline.parallel.stages import build_stages, stage_state_dict

    args = small_args(**ARGS)
    whole = _whole_model()
    stages = build_stages(args, pp_rank=1, pp_size=2, seed=7, device=torch.device("cpu"))
    own = stage_state_dict(stages)
    expected = {k for k in whole if k.startswith(("layers.2.", "layers.3.")) or k in ("final_norm.weight", "output_layer.weight")}
    assert set(own) == expected  # no embedding, no FAM prompt, no layers 0-1 on the last stage
    for name in expected:
        assert torch.equal(own[name], whole[name]), name


def test_initial_values_follow_megatrons_rules():
    args = small_args(**{**ARGS, "hidden_size": 256, "num_attention_heads": 8, "num_query_groups": 4})
    from model import build_model

    state = build_model(args, device="cpu", seed=3).state_dict()
    std = args.init_method_std
    assert torch.equal(state["layers.0.input_norm.weight"], torch.ones(256))
    for name, expected in [("layers.1.mlp.linear_fc1.weight", std), ("embedding.weight", std),
                           ("layers.1.attention.linear_proj.weight", std / math.sqrt(2 * args.num_layers)),
                           ("layers.1.mlp.linear_fc2.weight", std / math.sqrt(2 * args.num_layers))]:
        assert abs(state[name].std().item() / expected - 1) < 0.05, name
    other = build_model(args, device="cpu", seed=4).state_dict()
    assert not torch.equal(state["embedding.weight"], other["embedding.weight"])  # the seed matters
