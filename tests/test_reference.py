"""The reference's invariants (fam-paper.md §6), each against an independent computation."""

from __future__ import annotations

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


def test_rope_relative_offsets_of_block_queries_are_never_negative():
    """Block queries see keys at positions <= their own, including the previous FAM's keys."""
    args = small_args()
    C, F = args.block_size, args.fam_len
    for t in range(3):
        block_q = torch.arange(t * C, (t + 1) * C)
        fam_keys = t * C - F + torch.arange(F)  # F_{t-1}: the F positions before block t
        assert (block_q[:, None] - fam_keys[None, :]).min() >= 1
