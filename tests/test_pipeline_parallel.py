"""Pipeline parallelism on gloo equals one process: loss and every gradient, PP=2 1F1B,
PP=2 interleaved, and TP=2 x PP=2. Also with the GPU's scan path (model/fast_scan.py over the
static buffers its CUDA graphs replay, shared by every layer of a stage), here uncompiled: the
schedules run a micro-batch's forward before an earlier one's backward, so the buffers serve
interleaved calls."""

from __future__ import annotations

import pytest
import torch

from tests.spawn import run_on_ranks

BATCH, SEQ, MICRO = 4, 37, 4  # 4 micro-batches of 1 sequence; a partial last block


def _args():
    from tests.test_reference import small_args

    return small_args(num_layers=4)


def _batch(vocab):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    offsets = torch.tensor([0.0, 17.5, 300.0, 0.0])
    return tokens, labels, offsets


def _reference_weights(args):
    from model.reference import ReferenceFAM
    from model.weights import megatron_state_from_reference

    torch.manual_seed(0)
    return megatron_state_from_reference(ReferenceFAM(args), args)


def _worker(rank, world_size, tp, pp, virtual, schedule, gpu_scan=False):
    import torch.distributed as dist

    import model.scan_graphs as scan_graphs

    from model.weights import merge_megatron_shards, shard_megatron_state
    from pipeline.parallel.groups import start_groups, stop_groups
    from pipeline.parallel.stages import build_schedule, build_stages, load_stage_state_dict, pipeline_step, stage_state_dict

    groups = start_groups(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    args = _args()
    stages = build_stages(args, groups.pp_rank, pp, virtual, device=torch.device("cpu"), tp_group=groups.tp_group)
    if gpu_scan:
        scan_graphs.MODE = "always"
        for _, stage in stages:
            for layer in stage.part.layers:
                layer.use_fast_scan = True
    full = shard_megatron_state(_reference_weights(args), groups.tp_rank, tp)
    load_stage_state_dict(stages, full)
    sched = build_schedule(stages, pp, MICRO, schedule, groups.pp_group, torch.device("cpu"))
    tokens, labels, offsets = _batch(args.vocab_size)
    loss = pipeline_step(sched, stages, tokens, labels, offsets)

    grads = {}
    for _, stage in stages:
        for name, p in stage.part.named_parameters():
            if name.startswith("layers."):  # local layer index -> global
                local, rest = name[len("layers."):].split(".", 1)
                name = f"layers.{stage.part.layer_range[int(local)]}.{rest}"
            grads[name] = p.grad.contiguous()
    assert grads.keys() == stage_state_dict(stages).keys()
    # Gather: over TP to full shape, then over PP (each stage owns distinct names).
    tp_parts = [None] * tp
    dist.all_gather_object(tp_parts, {k: v for k, v in grads.items()}, group=groups.tp_group)
    merged = merge_megatron_shards(tp_parts)
    pp_parts = [None] * pp
    dist.all_gather_object(pp_parts, {k: v.numpy() for k, v in merged.items()}, group=groups.pp_group)
    losses = [None] * pp
    dist.all_gather_object(losses, None if loss is None else loss.item(), group=groups.pp_group)
    stop_groups()
    if rank != 0:
        return None
    all_grads = {}
    for part in pp_parts:
        all_grads.update(part)
    return {"loss": next(x for x in losses if x is not None), "grads": all_grads}


def _single_process():
    from model import build_model

    args = _args()
    model = build_model(args)
    model.load_state_dict(_reference_weights(args))
    tokens, labels, offsets = _batch(args.vocab_size)
    loss = model(tokens, labels=labels, position_offset=offsets).loss
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad.numpy() for n, p in model.named_parameters()}}


def _single_worker(rank, world_size):
    return _single_process()


@pytest.mark.parametrize(
    "tp, pp, virtual, schedule, gpu_scan",
    [(1, 2, 1, "1f1b", False), (1, 2, 2, "interleaved_1f1b", False), (2, 2, 1, "1f1b", False),
     (1, 2, 1, "gpipe", False), (1, 2, 2, "interleaved_1f1b", True)],
)
def test_pipeline_matches_one_process_loss_and_every_gradient(tp, pp, virtual, schedule, gpu_scan):
    one = run_on_ranks(_single_worker, 1)[0]
    got = run_on_ranks(_worker, tp * pp, tp, pp, virtual, schedule, gpu_scan)[0]
    # fp32. The single process takes the mean over 4 x 37 tokens at once; the pipeline the mean
    # of 4 micro-batch means (equal sizes, so the same number) with gradients scaled by 1/4:
    # rounding differences only, relative 1e-5 of each tensor's largest entry.
    assert abs(got["loss"] - one["loss"]) < 1e-5
    assert got["grads"].keys() == one["grads"].keys()
    for name, expected in one["grads"].items():
        assert abs(got["grads"][name] - expected).max() <= 1e-5 * abs(expected).max(), name


def test_uneven_layers_need_a_layout():
    from pipeline.parallel.stages import split_layers

    with pytest.raises(ValueError, match=r"num_layers=5 does not divide over 2 .*\[3, 2\]"):
        split_layers(5, 2)
    assert split_layers(5, 2, [3, 2]) == [range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match="pipeline_layout"):
        split_layers(5, 2, [4, 2])
