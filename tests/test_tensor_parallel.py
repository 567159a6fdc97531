"""Tensor parallelism on gloo: TP=2 and TP=4 equal TP=1, loss and every gradient at full shape."""

from __future__ import annotations

import pytest
import torch

from tests.spawn import run_on_ranks

SEQ = 37  # a partial last block


def _args(kind: str):
    from tests.test_reference import small_args

    if kind == "mha":
        return small_args(num_layers=2, num_attention_heads=4, num_query_groups=None, ffn_multiplier=2)
    if kind == "gqa":
        return small_args(num_layers=2, num_attention_heads=8, num_query_groups=4, hidden_size=64, ffn_multiplier=2)
    return small_args(num_layers=2, fam_len=0)  # bswa


def _worker(rank, world_size, kind, sequence_parallel=False, seq=SEQ, chunked_loss=False, own_group=False):
    """own_group: megatron's global groups are TP=1 (its TP group is this rank alone) and the
    model gets a TP group of all ranks made here: a layer that used megatron's group instead of
    the one passed would skip its all-reduces and change the loss and gradients."""
    import torch.distributed as dist

    from model import build_model
    from model.reference import ReferenceFAM
    from model.weights import load_reference_weights, merge_megatron_shards
    from pipeline.parallel.groups import start_groups, stop_groups

    groups = start_groups(tensor_parallel_size=1 if own_group else world_size)
    tp_group = dist.new_group(list(range(world_size))) if own_group else groups.tp_group
    args = _args(kind)
    torch.manual_seed(0)
    reference = ReferenceFAM(args)  # the same full weights on every rank
    tp_rank, tp_size = tp_group.rank(), tp_group.size()
    model = build_model(args, sequence_parallel=sequence_parallel, tp_group=tp_group)
    load_reference_weights(model, reference, args, tp_rank, tp_size)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, seq), generator=g)
    labels = torch.randint(0, args.vocab_size, (2, seq), generator=g)
    if chunked_loss:  # the training path: loss from hidden states in chunks of 5 tokens, no logits
        import model.language_model as lm

        lm.LOSS_CHUNK_ELEMENTS = 2 * (args.vocab_size // tp_size) * 5
    out = model(tokens, labels=labels, position_offset=torch.tensor([3.0, 1000.5]), return_logits=not chunked_loss)
    out.loss.backward()  # SP: the norm weights' partial gradients are summed over TP in backward

    shards = [{} for _ in range(tp_size)]
    for name, p in model.named_parameters():
        parts = [torch.empty_like(p.grad) for _ in range(tp_size)]
        dist.all_gather(parts, p.grad.contiguous(), group=tp_group)
        for r in range(tp_size):
            shards[r][name] = parts[r]
        if not getattr(p, "tensor_model_parallel", False):  # replicated: identical on every rank
            assert all(torch.equal(parts[0], x) for x in parts), name
    full = merge_megatron_shards(shards)
    stop_groups()
    return {"loss": out.loss.item(), "grads": {k: v.numpy() for k, v in full.items()}} if rank == 0 else None


@pytest.mark.parametrize("kind, tp, chunked", [("mha", 2, False), ("gqa", 2, True), ("gqa", 4, False), ("bswa", 2, False)])
def test_tp_matches_tp1_loss_and_every_gradient(kind, tp, chunked):
    tp1 = run_on_ranks(_worker, 1, kind)[0]
    tpn = run_on_ranks(_worker, tp, kind, False, SEQ, chunked)[0]
    # fp32; TP changes only the order of reductions (row-parallel all-reduce, vocab-parallel
    # softmax), so results agree to rounding: relative 1e-5 of each tensor's largest entry.
    assert abs(tpn["loss"] - tp1["loss"]) < 1e-6
    assert tpn["grads"].keys() == tp1["grads"].keys()
    for name, expected in tp1["grads"].items():
        got = tpn["grads"][name]
        assert got.shape == expected.shape, name
        assert abs(got - expected).max() <= 1e-5 * abs(expected).max(), name


@pytest.mark.parametrize("kind", ["gqa", "bswa"])
def test_sequence_parallel_matches_tp1_loss_and_every_gradient(kind):
    """SP shards norms, residuals and the FAM rows along the token dimension; the math must not
    change. 36 tokens (divisible by TP=2) still end in a partial block of 4."""
    tp1 = run_on_ranks(_worker, 1, kind, False, 36)[0]
    sp = run_on_ranks(_worker, 2, kind, True, 36, True)[0]
    assert abs(sp["loss"] - tp1["loss"]) < 1e-6
    for name, expected in tp1["grads"].items():
        assert abs(sp["grads"][name] - expected).max() <= 1e-5 * abs(expected).max(), name


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "sp_tp2"])
def test_the_model_uses_only_the_tp_group_it_is_given(sequence_parallel):
    """Megatron's global TP group has size 1 here and the model's (passed down by build_model)
    size 2: the embedding, attention and MLP linears, the FAM scan's mappings, the SP norm hook,
    the output layer and the loss must all reduce over the given group to match TP=1."""
    tp1 = run_on_ranks(_worker, 1, "gqa", False, 36)[0]
    own = run_on_ranks(_worker, 2, "gqa", sequence_parallel, 36, not sequence_parallel, True)[0]
    # the same bounds as the TP tests above: only the order of reductions changes
    assert abs(own["loss"] - tp1["loss"]) < 1e-6
    for name, expected in tp1["grads"].items():
        assert abs(own["grads"][name] - expected).max() <= 1e-5 * abs(expected).max(), name


def test_sequence_parallel_needs_fam_rows_divisible_by_tp():
    from model.config import to_fam_config
    from tests.test_reference import small_args

    with pytest.raises(ValueError, match="fam_len=3: must be divisible by tensor_parallel_size=2 with sequence parallelism"):
        to_fam_config(small_args(fam_len=3), tensor_parallel_size=2, sequence_parallel=True)
