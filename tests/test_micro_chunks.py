"""model/micro_chunks.py: one long sequence trained in micro-chunks (issue 14).

Exact mode against one whole-sequence call (`model(tokens, labels=labels, return_logits=False)
.loss.backward()`): loss, every parameter gradient and the final state, for FAM with and without
memory (memory spanning micro-chunks too), BSWA, a partial last block, per-layer recompute, a
passed-in state (RSP and streaming, with the state's own gradient) and RPO offsets per example;
TP=2 and SP at TP=2 on gloo against the TP=1 whole call. Truncated mode against a loop that
detaches the state, and visibly different from exact. Peak memory on CPU (every allocation,
from the profiler) grows with the number of micro-chunks only by the saved boundary states.
"""

from __future__ import annotations

import pytest
import torch

from model import FAMState, LayerState, build_model
from model.micro_chunks import chunk_spans, micro_chunked_forward_backward, state_bytes
from tests.spawn import run_on_ranks
from tests.test_reference import small_args

# fp32. A chunked run computes the whole call's function in another order (each chunk's
# attention over its own keys, the loss as weighted chunk means, gradients summed chunk by
# chunk), so the two differ by rounding: measured at most 6e-7 of each tensor's largest entry,
# and one ulp (4.8e-7) of the loss, ~4.2. A lost state gradient moves some gradient by 0.86 of
# its largest entry, equal weights for a short last chunk by 0.39 (and the loss by 3.4e-3).
RTOL = 1e-5
LOSS_TOL = 4e-6  # ~1e-6 of the loss: a few ulps from the chunk weighting's extra roundings
OFFSETS = torch.tensor([3.0, 1000.5])  # RPO: one position offset per example, for every chunk


def _rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_grads_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        assert _rel_diff(got[name], e) <= RTOL, (name, _rel_diff(got[name], e))


def _copies(args, n: int):
    torch.manual_seed(0)
    first = build_model(args)
    others = [build_model(args) for _ in range(n - 1)]
    for m in others:
        m.load_state_dict(first.state_dict())
    return [first, *others]


def _data(seq: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, seq), generator=g), torch.randint(0, 64, (2, seq), generator=g)


def _assert_states_close(got: FAMState, expected: FAMState) -> None:
    assert (got.position, got.ends_mid_block) == (expected.position, expected.ends_mid_block)
    for a, b in zip(got.layers, expected.layers):
        for x, y in ((a.fam, b.fam), (a.mem_k, b.mem_k), (a.mem_v, b.mem_v)):
            assert (x is None) == (y is None)
            if x is not None:
                assert not x.requires_grad and _rel_diff(x, y) <= RTOL


# name -> (model overrides, sequence length, micro_chunk_len); block_size 8, m = 2 unless set
CASES = {
    "fam, memory spans chunks (chunk_len = C < m*C)": ({}, 40, 8),
    "fam, chunk_len = m*C": ({}, 64, 16),
    "fam, no memory (m = 0)": ({"mem_blocks": 0}, 40, 8),
    "fam, F = C": ({"fam_len": 8}, 32, 8),
    "bswa (F = 0)": ({"fam_len": 0}, 48, 8),
    "fam, partial last block in the last chunk": ({}, 37, 8),
    "fam, recompute per layer": ({"recompute": True}, 40, 8),
}


@pytest.mark.parametrize("case", CASES)
def test_exact_mode_equals_one_whole_call_loss_every_gradient_and_state(case):
    over, seq, chunk_len = CASES[case]
    assert len(chunk_spans(seq, chunk_len)) >= 4
    whole, chunked = _copies(small_args(num_layers=3, **over), 2)
    tokens, labels = _data(seq)
    expected = whole(tokens, labels=labels, position_offset=OFFSETS, return_logits=False)
    expected.loss.backward()
    got = micro_chunked_forward_backward(chunked, tokens, labels, chunk_len, position_offset=OFFSETS)
    assert abs(got.loss.item() - expected.loss.item()) < LOSS_TOL and got.logits is None
    _assert_grads_close(_grads(chunked), _grads(whole))
    _assert_states_close(got.state, expected.state)


def _given_state(kind: str, model, args) -> FAMState:
    """RSP: one detached FAM per layer [F, 1, h], positions restart. Streaming: the full state
    (FAM and memory K/V) after 24 tokens, positions continue at 24."""
    if kind == "rsp":
        torch.manual_seed(5)
        return FAMState([LayerState(torch.randn(args.fam_len, 1, args.hidden_size)) for _ in range(args.num_layers)])
    with torch.no_grad():
        return model(_data(24, seed=7)[0], position_offset=OFFSETS).state


def _requiring_grad(state: FAMState) -> FAMState:
    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_(True)

    return FAMState([LayerState(leaf(s.fam), leaf(s.mem_k), leaf(s.mem_v)) for s in state.layers], state.position)


@pytest.mark.parametrize("kind", ["rsp", "streaming"])
def test_exact_mode_from_a_given_state_equals_one_whole_call_including_the_states_gradient(kind):
    args = small_args(num_layers=3)
    whole, chunked = _copies(args, 2)
    state = _given_state(kind, whole, args)
    s_whole, s_chunked = _requiring_grad(state), _requiring_grad(state)
    tokens, labels = _data(37)
    expected = whole(tokens, labels=labels, state=s_whole, position_offset=OFFSETS, return_logits=False)
    expected.loss.backward()
    got = micro_chunked_forward_backward(chunked, tokens, labels, 8, state=s_chunked, position_offset=OFFSETS)
    assert abs(got.loss.item() - expected.loss.item()) < LOSS_TOL
    _assert_grads_close(_grads(chunked), _grads(whole))
    _assert_states_close(got.state, expected.state)
    for a, b in zip(s_chunked.layers, s_whole.layers):  # the caller's state gets its gradient too
        for x, y in ((a.fam, b.fam), (a.mem_k, b.mem_k), (a.mem_v, b.mem_v)):
            if x is not None:
                assert _rel_diff(x.grad, y.grad) <= RTOL


def _detaching_reference(model, tokens, labels, chunk_len, position_offset):
    """Truncated micro-chunks written plainly: chunk calls with the state detached between them,
    one backward of the mean over all tokens at the end."""
    seq, state, total = tokens.shape[1], None, 0.0
    for lo, hi in chunk_spans(seq, chunk_len):
        out = model(tokens[:, lo:hi], labels=labels[:, lo:hi], state=state, position_offset=position_offset,
                    return_logits=False)
        total = total + out.loss * ((hi - lo) / seq)
        state = out.state.detach()
    total.backward()
    return total, state


@pytest.mark.parametrize("over", [{}, {"fam_len": 0}], ids=["fam", "bswa"])
def test_truncated_mode_equals_the_detaching_loop_and_differs_from_exact(over):
    reference, truncated, exact = _copies(small_args(num_layers=3, **over), 3)
    tokens, labels = _data(37)
    ref_loss, ref_state = _detaching_reference(reference, tokens, labels, 8, OFFSETS)
    got = micro_chunked_forward_backward(truncated, tokens, labels, 8, position_offset=OFFSETS, truncated=True)
    assert abs(got.loss.item() - ref_loss.item()) < LOSS_TOL
    _assert_grads_close(_grads(truncated), _grads(reference))
    _assert_states_close(got.state, ref_state)
    # Same forward, so the same loss; the gradients differ only by what crosses boundaries.
    full = micro_chunked_forward_backward(exact, tokens, labels, 8, position_offset=OFFSETS)
    assert abs(full.loss.item() - got.loss.item()) < LOSS_TOL
    diffs = {name: _rel_diff(g, _grads(exact)[name]) for name, g in _grads(truncated).items()}
    # Every weight of the first layer shapes the states of all layers, so every one of its
    # gradients loses the boundary terms (BSWA's last-layer FFN feeds no state: equal there).
    first_layer = [d for name, d in diffs.items() if name.startswith("layers.0.")]
    assert min(first_layer) > 1e-3 and max(diffs.values()) > 1e-2, diffs  # >= 100x RTOL


def _profiled_peak_bytes(fn) -> int:
    """Peak, over the call, of bytes allocated minus bytes freed (every CPU allocation, as the
    profiler records it), relative to the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # prof.events() orders them by microsecond only
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_exact_mode_peak_memory_grows_only_by_the_saved_boundary_states():
    """4 and 16 micro-chunks of 64 tokens: one chunk's activations either way; the longer
    sequence adds only its 12 extra boundary states (and the whole call grows ~5x)."""
    from model.config import ModelArgs

    args = ModelArgs(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_multiplier=4,
                     vocab_size=256, block_size=32, mem_blocks=2, fam_len=8)
    (model,) = _copies(args, 1)
    chunk_len, peaks, states = 64, {}, {}
    for chunks in (4, 16):
        tokens = torch.randint(0, 256, (2, chunks * chunk_len))
        with torch.no_grad():
            states[chunks] = state_bytes(model(tokens[:, :chunk_len]).state)  # one boundary
        model.zero_grad(set_to_none=True)
        peaks[chunks] = _profiled_peak_bytes(lambda: micro_chunked_forward_backward(model, tokens, tokens, chunk_len))
    model.zero_grad(set_to_none=True)
    whole = _profiled_peak_bytes(lambda: model(tokens, labels=tokens, return_logits=False).loss.backward())
    extra_states = 12 * states[4]
    print(f"peak 4 chunks {peaks[4]} B, 16 chunks {peaks[16]} B, 12 boundary states {extra_states} B, "
          f"one call over the 16 chunks {whole} B")
    # The profiler reports exact tensor sizes, so the rest of the peak is the same at any length;
    # 1% of the peak (less than one boundary state, 74 kB here) covers small per-chunk tensors.
    assert abs(peaks[16] - peaks[4] - extra_states) <= 0.01 * peaks[4]
    assert extra_states < 0.25 * peaks[4]  # the states are small beside one chunk's activations
    assert whole > 4 * peaks[16]  # the profiler sees activations: the whole call holds them all


def _tp_worker(rank, world_size, sequence_parallel, chunk_len):
    """TP=world_size rank: the reference's weights; loss and every gradient gathered to full
    shapes. chunk_len None: one whole call."""
    import torch.distributed as dist

    from model.reference import ReferenceFAM
    from model.weights import load_reference_weights, merge_megatron_shards
    from pipeline.parallel.groups import start_groups, stop_groups
    from tests.test_tensor_parallel import _args

    groups = start_groups(tensor_parallel_size=world_size)
    args = _args("gqa")  # 8 heads in 4 groups, C = 8, m = 2, F = 4 (divisible by TP for SP)
    torch.manual_seed(0)
    reference = ReferenceFAM(args)
    tp_rank, tp_size = groups.tp_rank, groups.tp_size
    model = build_model(args, sequence_parallel=sequence_parallel, tp_group=groups.tp_group)
    load_reference_weights(model, reference, args, tp_rank, tp_size)
    tokens, labels = _data(36)  # a partial last block of 4 tokens, still divisible by TP=2
    if chunk_len is None:
        loss = model(tokens, labels=labels, position_offset=OFFSETS, return_logits=False).loss
        loss.backward()
    else:
        loss = micro_chunked_forward_backward(model, tokens, labels, chunk_len, position_offset=OFFSETS).loss
    refused = ""
    if sequence_parallel:  # 37 tokens: the last micro-chunk (5) cannot be split over 2 ranks
        try:
            micro_chunked_forward_backward(model, *_data(37), chunk_len)
        except ValueError as e:
            refused = str(e)
    shards = [{} for _ in range(tp_size)]
    for name, p in model.named_parameters():
        parts = [torch.empty_like(p.grad) for _ in range(tp_size)]
        dist.all_gather(parts, p.grad.contiguous(), group=groups.tp_group)
        for r in range(tp_size):
            shards[r][name] = parts[r]
    full = merge_megatron_shards(shards)
    stop_groups()
    if rank:
        return None
    return {"loss": loss.item(), "grads": {k: v.numpy() for k, v in full.items()}, "refused": refused}


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "sp_tp2"])
def test_exact_mode_at_tp2_equals_the_tp1_whole_call(sequence_parallel):
    whole = run_on_ranks(_tp_worker, 1, False, None)[0]
    chunked = run_on_ranks(_tp_worker, 2, sequence_parallel, 8)[0]  # 5 micro-chunks, C < m*C
    # TP adds only reordered reductions (row-parallel all-reduce, vocab-parallel softmax) to
    # the chunking's rounding: the same relative bound, as in tests/test_tensor_parallel.py.
    assert abs(chunked["loss"] - whole["loss"]) < LOSS_TOL
    _assert_grads_close({k: torch.from_numpy(v) for k, v in chunked["grads"].items()},
                        {k: torch.from_numpy(v) for k, v in whole["grads"].items()})
    if sequence_parallel:
        assert "divisible by tensor_parallel_size=2" in chunked["refused"]
        assert "last micro-chunk 5 tokens" in chunked["refused"]


def test_settings_without_a_chunkable_state_are_refused_with_the_reason():
    from model import ModelPart, build_model_parts

    (fam,) = _copies(small_args(), 1)
    tokens, labels = _data(32)
    with pytest.raises(ValueError, match=r"micro_chunk_len=12 must be a positive multiple of model.block_size=8"):
        micro_chunked_forward_backward(fam, tokens, labels, 12)
    with pytest.raises(ValueError, match=r"micro_chunk_len=0 must be a positive multiple"):
        micro_chunked_forward_backward(fam, tokens, labels, 0)
    with pytest.raises(ValueError, match=r"labels must have the shape of tokens \(2, 32\), got \(2, 31\)"):
        micro_chunked_forward_backward(fam, tokens, labels[:, 1:], 8)
    with torch.no_grad():
        partial = fam(tokens[:, :5]).state
    with pytest.raises(ValueError, match=r"given state \(position 5\) ends in a partial block of model.block_size=8"):
        micro_chunked_forward_backward(fam, tokens, labels, 8, state=partial)
    assert all(p.grad is None for p in fam.parameters())  # refused before any work
    (dense,) = _copies(small_args(attention="dense", fam_len=0), 1)
    with pytest.raises(ValueError, match=r"model.attention='dense' has no O\(1\) state"):
        micro_chunked_forward_backward(dense, tokens, labels, 8)
    args = small_args()
    (stage,) = build_model_parts(args, [ModelPart(range(args.num_layers), last=False)])
    with pytest.raises(ValueError, match="needs the whole model on this rank"):
        micro_chunked_forward_backward(stage, tokens, labels, 8)
