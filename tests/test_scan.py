"""The fast FAM scan (model/fast_scan.py, the GPU path, run here uncompiled) against the eager
per-step autograd scan (model/scan.py, its oracle): outputs, the returned state, every parameter
gradient and the gradient of a passed-in state; TP=2 and SP on gloo; over the static buffers the
GPU's CUDA graphs replay (model/scan_graphs.py), shared by layers, models and lengths; broken
variants go red. Also: the block attention's key tiles (model/masks.py) and the compile budget."""

from __future__ import annotations

import pytest
import torch

import model.compile_limits as compile_limits
import model.fast_scan as fast_scan_module
import model.masks as masks
import model.scan_buffers as scan_buffers
import model.scan_graphs as scan_graphs
import model.scan_step as scan_step
from model import FAMState, LayerState, build_model
from model.compile_limits import SHAPE_LIMIT, CompileLimitError, bounded_compiles, shape_limit
from tests.spawn import run_on_ranks
from tests.test_reference import small_args

# fp32. Both scans compute the same function in a different order (hand-written backward,
# manual softmax, each weight gradient summed by one GEMM instead of per block): they differ by
# rounding, measured <= 6e-7 of each tensor's largest entry; 2e-5 leaves a 30x margin, and every
# broken variant below is off by more than 1e-3.
RTOL = 2e-5


def rel_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)


def use_fast_scan(model, fast: bool) -> None:
    for layer in model.layers:
        layer.use_fast_scan = fast


def _tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _leaf_state(args, batch: int) -> FAMState:
    """A passed-in state as micro-chunked training sees it: a FAM of batch 1 (RSP) and m blocks of
    memory K/V, all leaves with gradients."""
    g = torch.Generator().manual_seed(2)
    mem = args.mem_blocks * args.block_size
    layers = []
    for _ in range(args.num_layers):
        fam = torch.randn(args.fam_len, 1, args.hidden_size, generator=g).requires_grad_()
        k, v = (torch.randn(mem, batch, args.query_groups, args.head_dim, generator=g).requires_grad_() for _ in "kv")
        layers.append(LayerState(fam, k, v))
    return FAMState(layers, position=mem)


def _run(args, fast: bool, seq: int, with_state: bool = False, seed: int = 0):
    """Two chained calls (the second continues from the first's state, not detached) on the same
    weights; returns logits, the final state, and every gradient (parameters, passed-in state)."""
    torch.manual_seed(seed)
    model = build_model(args, seed=1234 + seed)  # the weights' seed (model/init.py), 1234 the default
    use_fast_scan(model, fast)
    state = _leaf_state(args, 2) if with_state else None
    tokens = _tokens(2, seq, seed=1 + seed)
    first = model(tokens[:, : 2 * args.block_size], labels=tokens[:, : 2 * args.block_size], state=state,
                  position_offset=torch.tensor([0.0, 77.5]))
    second = model(tokens[:, 2 * args.block_size :], labels=tokens[:, 2 * args.block_size :], state=first.state,
                   position_offset=torch.tensor([0.0, 77.5]))
    (first.loss + second.loss).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    if with_state:
        for i, s in enumerate(state.layers):
            grads.update({f"state.{i}.{key}": getattr(s, key).grad for key in ("fam", "mem_k", "mem_v")})
    return {"logits": torch.cat([first.logits, second.logits], 1), "state": second.state, "grads": grads}


def _differences(args, seq: int, with_state: bool = False, seed: int = 0) -> dict[str, float]:
    eager, fast = _run(args, False, seq, with_state, seed), _run(args, True, seq, with_state, seed)
    out = {"logits": rel_diff(fast["logits"], eager["logits"])}
    for i, (a, b) in enumerate(zip(fast["state"].layers, eager["state"].layers)):
        for key in ("fam", "mem_k", "mem_v"):
            if getattr(b, key) is not None:
                out[f"returned state.{i}.{key}"] = rel_diff(getattr(a, key), getattr(b, key))
    out.update({name: rel_diff(fast["grads"][name], grad) for name, grad in eager["grads"].items()})
    return out


CASES = {
    "whole blocks": ({}, 40),
    "partial last block": ({}, 37),
    "multi-query": ({"num_query_groups": 1}, 37),
    "no memory blocks": ({"mem_blocks": 0}, 40),
    "FAM as long as a block": ({"fam_len": 8}, 37),
    "activation recompute": ({"recompute": True}, 37),
}


@pytest.mark.parametrize("case", CASES)
def test_fast_scan_matches_eager_scan_outputs_state_and_every_gradient(case):
    over, seq = CASES[case]
    diffs = _differences(small_args(num_layers=3, **over), seq)
    assert len(diffs) > 20
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert not bad, bad


def test_fast_scan_gives_a_passed_in_state_and_the_returned_state_their_gradients():
    """Micro-chunked training: the first call starts from a leaf state (FAM of batch 1, memory
    K/V), the second from the first's returned state; both losses back-propagate into both."""
    diffs = _differences(small_args(num_layers=2), 37, with_state=True)
    assert {f"state.{i}.{key}" for i in range(2) for key in ("fam", "mem_k", "mem_v")} <= diffs.keys()
    bad = {name: d for name, d in diffs.items() if not d <= RTOL}
    assert not bad, bad


BREAKS = {
    "RoPE backward without the rotation": ("_rope_backward", lambda dy, cos, sin: dy * cos),
    "norm backward without its projection": ("_normalize_backward", lambda d_xh, xh, r: r * d_xh),
    "gate backward without silu's second term": (
        "_gate_backward", lambda d_h, gate, up: (d_h * up * torch.sigmoid(gate), d_h * gate * torch.sigmoid(gate))),
}


@pytest.mark.parametrize("name", [*BREAKS, "weight gradients from the last block only"])
def test_a_broken_fast_scan_goes_red(name, monkeypatch):
    """Each deliberately broken backward must exceed the tolerance above, by far."""
    if name in BREAKS:
        monkeypatch.setattr(scan_step, *BREAKS[name])
    else:
        full = fast_scan_module.weight_gradients
        first = lambda group: type(group)(*(x[:1] for x in group))  # noqa: E731
        monkeypatch.setattr(fast_scan_module, "weight_gradients",
                            lambda saved, grads, weights: full(first(saved), first(grads), weights))
    diffs = _differences(small_args(num_layers=2), 37)
    assert max(diffs.values()) > 50 * RTOL, diffs


# Broken variants of the static buffers: the weights not copied in any more (weights copied), every
# layer replaying the first layer's loops (weights read in place: loops not told apart by the weights'
# addresses), the partial last block's mask not copied in.
STATIC_CASES = [(stale, in_place) for in_place in (True, False)
                for stale in (None, "weights in place" if in_place else "weights copied", "partial-block mask")]


@pytest.mark.parametrize("stale, in_place", STATIC_CASES)
def test_static_buffers_carry_each_calls_weights_inputs_and_length(stale, in_place, monkeypatch):
    """The buffers the GPU's CUDA graphs replay over (model/scan_graphs.py), here on CPU: one set
    per shape key, shared by both layers, by two models with different weights and tokens, and
    by second calls of 21 and 19 tokens (3 blocks each, the last partial: the same key, another
    mask), each from a passed-in state. The weights are read in place by each layer's own loops
    (fp32 here is the GEMM dtype, as bf16 is under bf16-mixed), or copied into the shared buffers.
    Every call must see its own inputs; a buffer or loop that keeps the previous call's weights or
    mask goes red."""
    monkeypatch.setattr(scan_graphs, "MODE", "always")
    monkeypatch.setattr(fast_scan_module, "WEIGHTS_IN_PLACE", in_place)
    scan_graphs.clear()
    if stale == "weights in place":
        monkeypatch.setattr(scan_graphs, "weights_key", lambda weights: ())
    elif stale:
        name = "weights" if stale == "weights copied" else "bias"
        copy_into = scan_buffers.copy_into
        monkeypatch.setattr(scan_buffers, "copy_into", lambda buffers, values: copy_into(
            buffers, {n: x for n, x in values.items() if n != name or "grads" not in buffers}))
    # init std 0.1, not 0.02: attention sharp enough that the last block's mask moves the
    # returned FAM by ~1e-2 (a stale mask at 0.02 moved it by only 5e-4)
    args = small_args(num_layers=2, init_method_std=0.1)
    diffs = {seq: _differences(args, seq, with_state=True, seed=i) for i, seq in enumerate((37, 35))}
    assert len(scan_graphs._CACHE) == 2  # first calls (2 blocks), second calls (3), both from a state
    loops = [len(scan.loops) for scan in scan_graphs._CACHE.values()]
    scan_graphs.clear()
    if stale:
        assert max(diffs[35].values()) > 50 * RTOL, diffs[35]
        return
    # 2 models x 2 layers x (forward, backward), or one pair for both models, per slot (a layer call in flight)
    assert loops == ([8, 8] if in_place else [4, 4]), loops
    for seq, d in diffs.items():
        bad = {name: x for name, x in d.items() if not x <= RTOL}
        assert not bad, (seq, bad)


def _tp_worker(rank, world_size, sequence_parallel):
    from pipeline.parallel.groups import start_groups, stop_groups

    groups = start_groups(tensor_parallel_size=world_size)
    args = small_args(num_layers=2, num_attention_heads=8, num_query_groups=4, hidden_size=64)
    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = build_model(args, sequence_parallel=sequence_parallel, tp_group=groups.tp_group)
        use_fast_scan(model, fast)
        out = model(_tokens(2, 36), labels=_tokens(2, 36, seed=3), position_offset=torch.tensor([3.0, 1000.5]))
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((out.logits, out.state, grads))
    (logits, state, grads), (fast_logits, fast_state, fast_grads) = results
    diffs = {"logits": rel_diff(fast_logits, logits)}
    for i, (a, b) in enumerate(zip(fast_state.layers, state.layers)):
        diffs[f"state.{i}.fam"] = rel_diff(a.fam, b.fam)
    diffs.update({name: rel_diff(fast_grads[name], g) for name, g in grads.items()})
    stop_groups()
    return diffs


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_fast_scan_matches_eager_scan_under_tensor_parallelism(sequence_parallel):
    """Each rank's shard of every gradient: the fast scan's collectives (each mapping's adjoint
    is the other mapping, model/scan_step.py) against megatron's autograd mappings. 36 tokens
    end in a partial block; SP shards the 4 FAM rows 2 per rank."""
    for rank, diffs in enumerate(run_on_ranks(_tp_worker, 2, sequence_parallel)):
        assert len(diffs) > 15
        bad = {name: d for name, d in diffs.items() if not d <= RTOL}
        assert not bad, (rank, bad)


def _tiles(layout: masks.BlockLayout):
    """Per query tile: (key tiles visited, of which full) of FlexAttention's block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(layout.mask_mod(), None, None, layout.q_len, layout.kv_len, device="cpu")
    partial, full = mask.kv_num_blocks[0, 0], mask.full_kv_num_blocks[0, 0]
    return (partial + full).tolist(), full.tolist()


def test_block_attention_pays_one_key_tile_per_query_tile_for_the_fam(monkeypatch):
    """fam-1b's blocks (C = 1024, F = 64, m = 3) at T = 3: FAM costs each query tile exactly one
    extra key tile over BSWA, and every tile that is full in BSWA stays full. With T*F = 192 not a
    multiple of the 128-row tile, unpadded FAM keys would shift every token tile off the grid."""
    fam = masks.BlockLayout(mem_len=0, seq_len=3 * 1024, block_size=1024, fam_len=64, mem_blocks=3)
    bswa = masks.BlockLayout(mem_len=0, seq_len=3 * 1024, block_size=1024, fam_len=0, mem_blocks=3)
    (fam_visited, fam_full), (bswa_visited, bswa_full) = _tiles(fam), _tiles(bswa)
    assert fam.fam_rows == 256
    assert [a - b for a, b in zip(fam_visited, bswa_visited)] == [1] * len(bswa_visited)
    assert fam_full == bswa_full
    monkeypatch.setattr(masks, "FAM_ALIGN", 1)  # the broken variant: no alignment
    unaligned_visited, unaligned_full = _tiles(fam)
    assert sum(unaligned_visited) > sum(fam_visited) and sum(unaligned_full) < sum(fam_full)


def test_compiled_calls_fail_loudly_past_the_shape_budget():
    """Past model.compile_limits.SHAPE_LIMIT graphs a function raises instead of silently running
    eagerly (which, for FlexAttention, materialises the S x S scores)."""
    double = torch.compile(lambda x: x * 2, dynamic=False, backend="eager")
    with shape_limit(2):
        with bounded_compiles("probe"):
            double(torch.ones(1))
            double(torch.ones(2))
        with pytest.raises(CompileLimitError, match="probe has been compiled for 2 different input shapes"):
            with bounded_compiles("probe"):
                double(torch.ones(3))
    # set back for the rest of the process: a fourth shape compiles again under the default budget
    with bounded_compiles("probe"):
        double(torch.ones(4))
    assert torch._dynamo.config.recompile_limit == SHAPE_LIMIT


@pytest.mark.parametrize("static_shapes", [2, 0], ids=["static, then dynamic", "dynamic only"])
def test_compiled_block_loads_equal_the_eager_ones_at_every_length(static_shapes, monkeypatch):
    """The scan's block loads (model/scan_buffers.py `fill_blocks`) compiled as on GPU, like the
    pointwise ops (static graphs for the first lengths, one dynamic graph past them), on this
    machine's inductor: every element written (the buffers start as NaN) and equal to the eager
    loads, at lengths with a whole and a partial last block, with the backward's FAM rows and
    without; more lengths than the compile limit allows graphs, and no CompileLimitError."""
    monkeypatch.setattr(compile_limits, "STATIC_SHAPES", static_shapes)
    loads = compile_limits.Pointwise(scan_buffers.fill_blocks)  # this test's own graphs
    F, C, b, g, d = 4, 8, 2, 2, 4
    lengths = (16, 13, 24, 5, 30, 8, 21, 40, 37, 48)
    with compile_limits.shape_limit(9):
        for i, S in enumerate(lengths):
            T = -(-S // C)
            k, v = torch.randn(S, b, g, d), torch.randn(S, b, g, d)
            fam = (torch.randn(T * F + 3, b, g, d), torch.randn(T * F + 3, b, g, d)) if i % 2 else (None, None)
            want = [torch.full((T, F + C, b, g, d), float("nan")) for _ in "kv"]
            got = [x.clone() for x in want]
            scan_buffers.fill_blocks(*want, k, v, *fam, F)
            with compile_limits.bounded_compiles("the test's block loads"):
                loads(*got, k, v, *fam, F)
            for a, e in zip(got, want):
                assert not a.isnan().any() and torch.equal(a, e), (S, fam[0] is None)
