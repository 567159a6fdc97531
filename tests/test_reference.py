"""The reference's invariants (docs/fam.md, "The algorithm" and "The oracle chain"), each against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F_

from model.config import ModelArgs
from model.reference import ReferenceFAM, rms_norm
from model.rope import apply_rope, rope_angles

# fp32 throughout; two computations of the same function in different orders agree to ~1e-6.
TOL = dict(rtol=1e-5, atol=1e-5)


def small_args(**kw) -> ModelArgs:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_multiplier=2,
                vocab_size=64, block_size=8, mem_blocks=2, fam_len=4)
    base.update(kw)
    return ModelArgs(**base)


def make(args: ModelArgs, seed: int = 0) -> ReferenceFAM:
    torch.manual_seed(seed)
    return ReferenceFAM(args)


def straightforward_bswa(model: ReferenceFAM, tokens: torch.Tensor) -> torch.Tensor:
    """Block sliding-window attention over the whole sequence with one dense mask: key k is
    visible from query q iff k <= q and block(q) - block(k) <= m. No block loop, no FAM."""
    a = model.args
    b, s = tokens.shape
    pos = torch.arange(s, dtype=torch.float64).expand(b, s)
    idx = torch.arange(s)
    mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] // a.block_size - idx[None, :] // a.block_size <= a.mem_blocks)
    cos, sin = rope_angles(pos, a.head_dim, a.rope_base)
    x = model.embed[tokens]
    for layer in model.layers:
        h = rms_norm(x, layer.attn_norm, a.norm_epsilon)
        q = apply_rope(layer.heads(h, layer.wq), cos[:, None], sin[:, None])
        k = apply_rope(layer.heads(h, layer.wk), cos[:, None], sin[:, None])
        v = layer.heads(h, layer.wv)
        o = F_.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = layer.ffn(o.transpose(1, 2).reshape(b, s, -1) @ layer.wo.t() + x)
    return rms_norm(x, model.final_norm, a.norm_epsilon) @ model.lm_head.t()


@pytest.mark.parametrize("seq", [40, 37])
def test_fam_len_zero_equals_straightforward_bswa(seq):
    model = make(small_args(fam_len=0))
    tokens = torch.randint(0, 64, (2, seq))
    logits, _ = model(tokens)
    torch.testing.assert_close(logits, straightforward_bswa(model, tokens), **TOL)


def test_no_memory_no_fam_is_causal_attention_within_each_block():
    model = make(small_args(fam_len=0, mem_blocks=0))
    tokens = torch.randint(0, 64, (2, 29))
    logits, _ = model(tokens)
    for start in range(0, 29, 8):
        alone, _ = model(tokens[:, start : start + 8], position_offset=float(start))
        torch.testing.assert_close(logits[:, start : start + 8], alone, **TOL)


def fam_states_per_block(model, tokens):
    """Stream block by block; the per-layer FAM after each block."""
    states, state = [], None
    for start in range(0, tokens.shape[1], model.args.block_size):
        _, state = model(tokens[:, start : start + model.args.block_size], state)
        states.append([f.clone() for f in state.fam])
    return states


@pytest.mark.parametrize("t", [0, 5, 21])  # inside block 0 (the soft-prompt block) and block 2, of 8 tokens
@pytest.mark.parametrize("fam_len", [0, 4])
def test_causality_of_outputs_and_fam_states(fam_len, t):
    model = make(small_args(fam_len=fam_len, num_layers=3))
    tokens = torch.randint(0, 64, (1, 40))
    changed = tokens.clone()
    changed[0, t] = (changed[0, t] + 1) % 64
    before, _ = model(tokens)
    after, _ = model(changed)
    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t:], after[:, t:])
    if fam_len:
        fam_before, fam_after = fam_states_per_block(model, tokens), fam_states_per_block(model, changed)
        for block in range(t // 8):  # every FAM of a block that ends before t is untouched
            for a, b in zip(fam_before[block], fam_after[block]):
                assert torch.equal(a, b)
        assert not torch.allclose(fam_before[t // 8][0], fam_after[t // 8][0])


def input_gradient(model, tokens, p):
    """|d logits[p] / d input embedding| per position; tokens are distinct so rows map to positions."""
    model.zero_grad()
    logits, _ = model(tokens)
    logits[0, p].sum().backward()
    return model.embed.grad[tokens[0]].abs().sum(-1)  # [s]


def test_bswa_receptive_field_is_depth_times_window_and_fam_reaches_further():
    args = small_args(fam_len=0, mem_blocks=1, num_layers=2, vocab_size=128)
    tokens = torch.randperm(128)[None, :96]
    p = 95
    horizon = args.num_layers * (args.mem_blocks + 1) * args.block_size  # L * (m + 1) * C
    grad = input_gradient(make(args), tokens, p)
    assert torch.all(grad[: p - horizon] == 0), "BSWA must not see further back than depth x window"
    assert grad[p - horizon :].gt(0).any()
    fam_grad = input_gradient(make(small_args(fam_len=4, mem_blocks=1, num_layers=2, vocab_size=128)), tokens, p)
    assert fam_grad[0] > 0, "FAM carries information from the first token to the last"


@pytest.mark.parametrize("pieces", [[16, 24], [8, 8, 8, 13], [40]])
@pytest.mark.parametrize("fam_len", [0, 4])
def test_streaming_in_pieces_equals_one_call(pieces, fam_len):
    model = make(small_args(fam_len=fam_len))
    tokens = torch.randint(0, 64, (2, sum(pieces)))
    whole, whole_state = model(tokens, position_offset=7.5)
    outs, state, start = [], None, 0
    for n in pieces:
        out, state = model(tokens[:, start : start + n], state, position_offset=7.5)
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), whole, **TOL)
    for a, b in zip(state.fam, whole_state.fam):
        if fam_len:
            torch.testing.assert_close(a, b, **TOL)


def record_reference_attention(model, tokens, offsets, monkeypatch) -> list[dict]:
    """Run the reference with a spy on its RoPE angles (tests/rope_spy.py) and on its attention
    kernel: per attention, in call order, the query and key positions the code computed and the
    mask it passed (None: full). Returns [{"q", "k" [b, L] float64, "mask", "keys"}]."""
    from tests import rope_spy

    events: list = []
    real_sdpa = F_.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        events.append(("attention", None if attn_mask is None else attn_mask.clone(), k.shape[2]))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F_, "scaled_dot_product_attention", sdpa)
    undo = rope_spy.install(_RecordInto(events))
    try:
        with torch.no_grad():
            model(tokens, position_offset=offsets)
    finally:
        undo()
    calls, pending = [], []
    for event in events:
        if event[0] == "rope":
            pending.append(event[1])
        else:  # one angle table for the prompt stream's queries and keys, two otherwise
            q, k = (pending[0], pending[0]) if len(pending) == 1 else pending
            calls.append({"q": q, "k": k, "mask": event[1], "keys": event[2]})
            pending = []
    return calls


class _RecordInto(list):
    """rope_spy's records, tagged as ("rope", positions) in a shared event list."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def append(self, record) -> None:
        self.events.append(("rope", record[1]))


def test_rope_positions_and_relative_offsets_the_reference_really_uses(monkeypatch):
    """From the positions the reference computes for RoPE and the mask it attends with, per
    example (RPO offsets 0 and 321.25), per block and layer (model/reference.py, Positions):
    tokens at offset + index; the prompt stream and the FAM keys of block t at the F positions
    before block t, FAM queries at block t's last F positions. Block queries never see a key at
    a larger position (the previous FAM's keys are strictly earlier); FAM queries see no memory
    block and offsets down to exactly -(F-1), only towards the last F-1 tokens of their block."""
    from tests.rope_spy import documented_fam_positions

    args = small_args(num_layers=2, mem_blocks=2)
    C, F, L = args.block_size, args.fam_len, args.num_layers
    offsets = torch.tensor([0.0, 321.25], dtype=torch.float64)
    S = 37  # five blocks, the last of 5 tokens
    tokens = torch.randint(0, 64, (2, S))
    calls = record_reference_attention(make(args), tokens, offsets, monkeypatch)
    T = -(-S // C)
    prompt_calls = [c for c in calls if c["mask"] is None]  # the soft-prompt stream, full attention
    block_calls = [c for c in calls if c["mask"] is not None]  # block by block, layer by layer
    assert len(prompt_calls) == L and len(block_calls) == T * L
    token_pos = offsets[:, None].numpy() + np.arange(S)
    fam_q, fam_k = documented_fam_positions(token_pos, C, F)
    for call in prompt_calls:  # F rows among themselves, queries and keys before the first block
        assert call["keys"] == F and np.array_equal(call["q"], fam_k[:, 0]) and np.array_equal(call["k"], fam_k[:, 0])
    memory: list[list[np.ndarray]] = [[] for _ in range(L)]
    for i, call in enumerate(block_calls):
        t, layer = divmod(i, L)
        lo, hi = t * C, min((t + 1) * C, S)
        assert np.array_equal(call["q"], np.concatenate([fam_q[:, t], token_pos[:, lo:hi]], axis=1)), (t, layer)
        assert np.array_equal(call["k"], np.concatenate([fam_k[:, t], token_pos[:, lo:hi]], axis=1)), (t, layer)
        mem = memory[layer][-args.mem_blocks:]
        keys = np.concatenate(mem + [call["k"]], axis=1)  # [mem; FAM; block], the reference's key order
        assert keys.shape[1] == call["keys"]
        offset = call["q"][:, :, None] - keys[:, None, :]  # [b, F + c, keys]: query minus key position
        visible = call["mask"].numpy()
        M = keys.shape[1] - F - (hi - lo)
        block_rows = offset[:, F:][:, visible[F:]]
        assert block_rows.min() >= 0, (t, layer)
        assert offset[:, F:, M : M + F][:, visible[F:, M : M + F]].min() >= 1  # the previous FAM: strictly earlier
        assert not visible[:F, :M].any()  # FAM queries never see a memory block
        fam_rows = offset[:, :F][:, visible[:F]]
        assert fam_rows.min() == -(F - 1), (t, layer)
        negative_keys = np.nonzero((offset[:, :F] < 0) & visible[None, :F])[2]
        assert negative_keys.min() >= M + F + max(0, hi - lo - (F - 1))  # only the block's last F-1 tokens
        memory[layer].append(call["k"][:, F:])
