"""The megatron-core model at TP=1 against the reference: logits and every gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import FAMState, LayerState, build_model
from model.config import ModelArgs, load_model_args, to_fam_config
from model.reference import ReferenceFAM, ReferenceState
from model.weights import load_reference_weights, reference_grads_as_megatron
from tests.test_reference import small_args

# fp32. The two models compute the same function in different orders (fused block loop vs
# layer-major scan + masked attention over the whole sequence), so they differ by rounding
# only: ~1e-7 relative per op, a few 1e-6 after a few layers. Gradients are compared relative
# to the largest entry of each tensor, since init std 0.02 makes them small in absolute terms.
RTOL = 2e-5


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return (a - b).abs().max().item() <= rtol * max(b.abs().max().item(), 1e-12)


def pair(args: ModelArgs, seed: int = 0):
    torch.manual_seed(seed)
    reference = ReferenceFAM(args)
    model = build_model(args)
    load_reference_weights(model, reference, args)
    return reference, model


CASES = {
    "fam": {},
    "fam_partial_block": {"_seq": 37},
    "bswa": {"fam_len": 0},
    "no_memory": {"mem_blocks": 0},
    "multi_query": {"num_query_groups": 1},
    "multi_head": {"num_query_groups": None},
    "fam_equals_block": {"fam_len": 8},
}


@pytest.mark.parametrize("case", CASES)
def test_tp1_matches_reference_logits_and_grads(case):
    kw = dict(CASES[case])
    seq = kw.pop("_seq", 40)
    args = small_args(num_layers=3, **kw)
    reference, model = pair(args)
    tokens, labels = torch.randint(0, 64, (2, seq)), torch.randint(0, 64, (2, seq))
    offset = torch.tensor([0.0, 321.25])  # RPO: one offset per example
    ref_logits, _ = reference(tokens, position_offset=offset)
    out = model(tokens, labels=labels, position_offset=offset)
    assert close(out.logits, ref_logits)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, 64), labels.reshape(-1))
    assert abs(out.loss.item() - ref_loss.item()) < 1e-6
    ref_loss.backward()
    out.loss.backward()
    expected = reference_grads_as_megatron(reference, args)
    for name, p in model.named_parameters():
        assert close(p.grad, expected[name]), name


@pytest.mark.parametrize("fam_len", [0, 4])
def test_streaming_with_state_equals_one_call(fam_len):
    args = small_args(fam_len=fam_len)
    reference, model = pair(args)
    tokens = torch.randint(0, 64, (2, 45))
    whole = model(tokens)
    pieces, state = [], None
    for lo, hi in [(0, 16), (16, 24), (24, 45)]:
        out = model(tokens[:, lo:hi], state=state)
        pieces.append(out.logits)
        state = out.state
    assert close(torch.cat(pieces, 1), whole.logits)
    assert state.position == 45 and state.ends_mid_block
    for a, b in zip(state.layers, whole.state.layers):
        if fam_len:
            assert close(a.fam, b.fam)
    with pytest.raises(ValueError, match="partial block"):
        model(tokens[:, :8], state=state)


def test_initial_state_matches_reference_random_state_passing():
    """A given per-layer FAM (RSP) replaces the prompt and is the first update's residual."""
    args = small_args()
    reference, model = pair(args)
    torch.manual_seed(1)
    fams = [torch.randn(1, args.fam_len, args.hidden_size) for _ in range(args.num_layers)]
    tokens = torch.randint(0, 64, (2, 24))
    ref_logits, _ = reference(tokens, ReferenceState(fam=fams))
    state = FAMState([LayerState(f.transpose(0, 1).contiguous()) for f in fams])
    out = model(tokens, state=state)
    assert close(out.logits, ref_logits)
    rsp = out.state.fam_only(index=1)
    assert rsp.position == 0 and rsp.layers[0].mem_k is None and rsp.layers[0].fam.shape[1] == 1
    assert not rsp.layers[0].fam.requires_grad


def test_recompute_gives_identical_loss_and_grads():
    args = small_args()
    torch.manual_seed(0)
    plain = build_model(args)
    again = build_model(small_args(recompute=True))
    again.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 64, (2, 40))
    for m in (plain, again):
        m(tokens, labels=tokens).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), again.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_dense_equals_bswa_with_a_window_covering_the_sequence():
    torch.manual_seed(0)
    dense = build_model(small_args(attention="dense", fam_len=0))
    bswa = build_model(small_args(fam_len=0, mem_blocks=10))
    bswa.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 64, (2, 40))
    assert close(dense(tokens).logits, bswa(tokens).logits)


@pytest.mark.parametrize(
    "overrides, tp, message",
    [
        ({"num_attention_heads": 6, "num_query_groups": 3, "hidden_size": 48}, 4, "num_attention_heads=6"),
        ({"num_query_groups": 1}, 2, "num_query_groups=1"),
        ({"block_size": 0}, 1, "block_size=0"),
        ({"fam_len": 9}, 1, "fam_len=9"),
        ({"mem_blocks": -1}, 1, "mem_blocks=-1"),
        ({"attention": "sparse"}, 1, "attention='sparse'"),
        ({"num_query_groups": 3}, 1, "num_query_groups=3"),
    ],
)
def test_bad_configurations_raise_one_clear_value_error(overrides, tp, message):
    with pytest.raises(ValueError, match=message):
        to_fam_config(small_args(**overrides), tensor_parallel_size=tp)


def test_unknown_config_name_and_key_are_clear_errors():
    with pytest.raises(ValueError, match="unknown config 'fam-2b'.*fam-1b"):
        load_model_args("fam-2b")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hiden_size'\].*hidden_size"):
        load_model_args("tiny", hiden_size=3)


def test_named_configs_have_the_papers_shapes():
    sizes = {"fam-1b": (18, 1536, 12, 8), "fam-8b": (32, 4096, 32, 4), "fam-24b": (56, 4096, 32, 8)}
    for name, (layers, hidden, heads, mult) in sizes.items():
        a = load_model_args(name)
        assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.ffn_size) == (layers, hidden, heads, mult * hidden)
        assert (a.vocab_size, a.block_size, a.mem_blocks, a.fam_len) == (256000, 1024, 3, 64)
        assert load_model_args(name.replace("fam", "bswa")).fam_len == 0
        assert load_model_args(name.replace("fam", "dense")).attention == "dense"
    assert load_model_args("fam-24b").query_groups == 1  # multi-query attention
    assert abs(load_model_args("fam-24b").num_params() / 24e9 - 1) < 0.05


@pytest.mark.parametrize("fam_len", [0, 4])
def test_chunked_loss_without_logits_equals_loss_from_logits(fam_len, monkeypatch):
    import model.language_model as lm

    monkeypatch.setattr(lm, "LOSS_CHUNK_ELEMENTS", 2 * 64 * 7)  # chunks of 7 tokens
    torch.manual_seed(0)
    a = build_model(small_args(fam_len=fam_len))
    b = build_model(small_args(fam_len=fam_len))
    b.load_state_dict(a.state_dict())
    tokens, labels = torch.randint(0, 64, (2, 37)), torch.randint(0, 64, (2, 37))
    full = a(tokens, labels=labels)
    chunked = b(tokens, labels=labels, return_logits=False)
    assert chunked.logits is None
    assert abs(full.loss.item() - chunked.loss.item()) < 1e-6
    full.loss.backward()
    chunked.loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert close(q.grad, p.grad), name


def record_megatron_layers(model, tokens, offsets, monkeypatch) -> list[dict]:
    """Run the megatron model with spies on the RoPE angles it computes (tests/rope_spy.py), on
    its block attention and on its FAM scan steps. Per layer, in call order: token query and key
    positions [b, S] (split_qkv_rope), FAM query and key tables [b, T, F] (FAMLayer._fam_rope), all
    three computed once and shared by the layers, the BlockLayout the block queries attend with, and
    each scan step's number of block keys."""
    import model.scan as scan_module
    from model.attention import FAMSelfAttention
    from tests import rope_spy

    events: list = []
    real_attend, real_step = FAMSelfAttention.attend_blocks, scan_module.fam_step

    def attend_blocks(self, q, k, v, layout):
        events.append(("blocks", layout))
        return real_attend(self, q, k, v, layout)

    def counted(fam, block_k, *rest):  # the CPU (eager) scan's step
        events.append(("scan", block_k.shape[0]))
        return real_step(fam, block_k, *rest)

    monkeypatch.setattr(FAMSelfAttention, "attend_blocks", attend_blocks)
    monkeypatch.setattr(scan_module, "fam_step", counted)
    records: list = []
    undo = rope_spy.install(records)
    try:
        with torch.no_grad():
            model(tokens, position_offset=offsets)
    finally:
        undo()
    # computed once per forward, in layer 0, and shared by every layer (model/rope.py SharedTables): the
    # tokens' (queries and keys: the same positions), then the FAM queries' and keys'
    (s1, tok), (s2, fam_q), (s3, fam_k) = records
    assert (s1, s2, s3) == ("model.rope", "model.layer", "model.layer")
    layers, scan = [], []
    for kind, value in events:
        if kind == "scan":
            scan.append(value)
            continue
        layers.append({"tok_q": tok.T, "tok_k": tok.T, "fam_q": fam_q, "fam_k": fam_k, "layout": value, "scan": scan})
        scan = []
    return layers


def test_megatron_layers_use_the_references_positions_and_offsets(monkeypatch):
    """The positions the megatron layer really computes, per example (RPO offsets 0 and 321.25)
    and layer, are model/reference.py's (tests/test_reference.py checks the reference's own):
    tokens at offset + index, FAM queries at each block's last F positions, FAM keys at the F
    positions before it. With the layer's own block mask (model/masks.py), block queries never
    see a key at a larger position and the previous FAM's keys are strictly earlier; the scan's
    FAM queries (the prompt step, then one step per block over that block's tokens) see offsets
    down to exactly -(F-1). Logit comparisons cannot see this: RoPE hides absolute positions."""
    from tests.rope_spy import documented_fam_positions

    args = small_args(num_layers=2, mem_blocks=2)
    C, F = args.block_size, args.fam_len
    _, model = pair(args)
    S = 37
    offsets = torch.tensor([0.0, 321.25])
    layers = record_megatron_layers(model, torch.randint(0, 64, (2, S)), offsets, monkeypatch)
    assert len(layers) == args.num_layers
    T = -(-S // C)
    token_pos = offsets[:, None].double().numpy() + np.arange(S)
    fam_q, fam_k = documented_fam_positions(token_pos, C, F)
    blocks = [(t * C, min((t + 1) * C, S)) for t in range(T)]
    for i, rec in enumerate(layers):
        assert np.array_equal(rec["tok_q"], token_pos) and np.array_equal(rec["tok_k"], token_pos), i
        assert np.array_equal(rec["fam_q"], fam_q) and np.array_equal(rec["fam_k"], fam_k), i
        assert rec["scan"] == [0] + [hi - lo for lo, hi in blocks], i  # the prompt step, then each block
        layout = rec["layout"]
        assert (layout.mem_len, layout.num_blocks, layout.block_size, layout.fam_len) == (0, T, C, F)
        # keys in the layout's order (model/masks.py): [FAM keys of every block; padding to R rows,
        # never visible (at +inf, so a visible one fails the bounds below); the S tokens]
        R = layout.fam_rows
        keys = np.concatenate([fam_k.reshape(2, T * F), np.full((2, R - T * F), np.inf), token_pos], axis=1)
        visible = layout.dense_mask("cpu").numpy()
        assert visible.shape == (S, R + S), i
        offset = token_pos[:, :, None] - keys[:, None, :]  # [b, S, keys]
        assert offset[:, visible].min() >= 0, i
        assert offset[:, :, :R][:, visible[:, :R]].min() >= 1, i
        assert visible[:, T * F : R].sum() == 0 and visible[:, :R].sum() == S * F, i  # each query its block's F
        for t, (lo, hi) in enumerate(blocks):  # the scan: FAM queries over [F_{t-1}; block t], unmasked
            fam_keys = np.concatenate([fam_k[:, t], token_pos[:, lo:hi]], axis=1)
            assert (fam_q[:, t, :, None] - fam_keys[:, None, :]).min() == -(F - 1), (i, t)
