"""model/rope.py against RoPE written independently as a complex rotation.

RoFormer (Su et al. 2021) in the rotate-half convention (GPT-NeoX, Llama): the head vector
x [d] is read as d/2 complex numbers z_j = x_j + i x_{j+d/2}, and position p turns z_j by the
angle p * theta_j, theta_j = base^(-2j/d). model/rope.py computes the same with cos/sin tables
and a rotate-half; here it is complex multiplication in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from model.rope import apply_rope, rope_angles, split_qkv_rope

# model/rope.py rounds cos/sin to fp32 (relative 6e-8) and rotates in fp32: with |x| <= ~4
# the result is within a few 1e-7 of the float64 rotation. A wrong frequency, pairing or sign
# moves entries by O(|x|).
ATOL = 2e-6


def complex_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x [..., s, d] rotated at positions broadcastable to [..., s], in float64."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])  # [d/2]
    angle = positions.to(torch.float64)[..., None] * theta  # [..., s, d/2]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("head_dim, base", [(16, 10000.0), (64, 10000.0), (8, 500000.0)])
def test_apply_rope_is_the_complex_rotation_of_half_split_pairs(head_dim, base):
    torch.manual_seed(0)
    b, n, s = 3, 2, 11
    x = torch.randn(b, n, s, head_dim)
    # per example: no offset, a fractional RPO offset, one near the largest (2 pi base) of training
    offsets = torch.tensor([0.0, 321.25, 2 * math.pi * 10000 - 20.5], dtype=torch.float64)
    positions = offsets[:, None] + torch.arange(s, dtype=torch.float64)  # [b, s]
    cos, sin = rope_angles(positions, head_dim, base)
    got = apply_rope(x, cos[:, None], sin[:, None]).double()
    want = complex_rope(x, positions[:, None, :], base)
    assert (got - want).abs().max() < ATOL
    assert (want - x.double()).abs().max() > 0.5  # the rotation is not the identity here


def test_the_qkv_split_rotates_megatron_layout_at_per_example_positions():
    """split_qkv_rope on megatron's grouped QKV [s, b, g, npg + 2, d]: q's heads and k rotated at
    their own positions [b, s], v untouched."""
    torch.manual_seed(1)
    s, b, g, npg, d = 9, 2, 3, 2, 16
    mixed = torch.randn(s, b, g, npg + 2, d)
    positions = torch.tensor([[0.0], [4000.5]], dtype=torch.float64) + torch.arange(s, dtype=torch.float64)  # [b, s]
    q, k, v = split_qkv_rope(mixed, positions, positions + 7.0, 10000.0)
    as_bnsd = lambda x: x.permute(1, 2, 0, 3)  # noqa: E731  [s, b, n, d] -> [b, n, s, d]
    want_q = complex_rope(as_bnsd(mixed[:, :, :, :npg].reshape(s, b, g * npg, d)), positions[:, None, :], 10000.0)
    want_k = complex_rope(as_bnsd(mixed[:, :, :, -2]), positions[:, None, :] + 7.0, 10000.0)
    assert (as_bnsd(q).double() - want_q).abs().max() < ATOL
    assert (as_bnsd(k).double() - want_k).abs().max() < ATOL
    assert torch.equal(v, mixed[:, :, :, -1])


def test_rope_keeps_the_dtype_and_rotates_bf16_in_fp32():
    torch.manual_seed(2)
    x = torch.randn(2, 1, 5, 16).to(torch.bfloat16)
    positions = torch.arange(5, dtype=torch.float64)[None].expand(2, 5) + 100.0
    got = apply_rope(x, *(t[:, None] for t in rope_angles(positions, 16, 10000.0)))
    assert got.dtype == torch.bfloat16
    want = complex_rope(x.float(), positions[:, None, :], 10000.0)
    assert (got.double() - want).abs().max() < 2e-2  # one bf16 rounding of values up to ~4: 2^-8 x 4


def _count_angles(monkeypatch) -> list:
    """Every rope_angles call the model makes (model.rope's for the tokens, model.layer's for the FAM rows)."""
    import model.layer
    import model.rope

    calls: list = []
    real = model.rope.rope_angles

    def counted(positions, head_dim, base):
        calls.append(tuple(positions.shape))
        return real(positions, head_dim, base)

    monkeypatch.setattr(model.rope, "rope_angles", counted)
    monkeypatch.setattr(model.layer, "rope_angles", counted)
    return calls


def test_a_forward_computes_the_rope_tables_once_for_all_its_layers(monkeypatch):
    """model/rope.py SharedTables: one forward of a 3-layer FAM model computes the tokens' table
    once (queries and keys share the positions) and the FAM rows' two once, not per layer; with
    recompute in backward (outside the forward's scope) each recomputed layer computes its own.
    Red if the layers compute their own (9 calls) or the scope leaks past the forward."""
    from model import build_model
    from tests.test_reference import small_args

    torch.manual_seed(0)
    model = build_model(small_args(num_layers=3))
    tokens = torch.randint(0, 64, (2, 40))
    calls = _count_angles(monkeypatch)
    out = model(tokens, labels=tokens)
    assert len(calls) == 3, calls
    out.loss.backward()
    assert len(calls) == 3
    model(tokens, labels=tokens)  # a new forward: new positions, computed again
    assert len(calls) == 6

    recomputing = build_model(small_args(num_layers=3, recompute=True))
    calls.clear()
    recomputing(tokens, labels=tokens).loss.backward()
    assert len(calls) == 3 + 3 * 3, calls  # the forward's, then each layer's recompute


def test_shared_tables_follow_positions_changed_in_place_and_live_only_in_a_scope():
    """A positions buffer written again (a pipeline stage receives every micro-batch's positions into
    the same tensor, a write that does not bump its version: here through .data) gets new tables in
    the next scope; in one scope an in-place change (a new version) does too; outside a scope nothing
    is kept. Red for a cache keyed by the tensor alone that outlives the scope."""
    from model.rope import SHARED, token_tables

    positions = torch.arange(6, dtype=torch.float32)[None].repeat(2, 1)  # [b, s]
    with SHARED.scope():
        first = token_tables(positions, 8, 10000.0)
        assert token_tables(positions, 8, 10000.0)[0] is first[0]  # shared within the scope
        positions.add_(1.0)  # a new version
        assert torch.equal(token_tables(positions, 8, 10000.0)[0], rope_angles(positions.T, 8, 10000.0)[0][:, :, None])
    positions.data.copy_(positions + 100.0)  # the version stays
    with SHARED.scope():
        again = token_tables(positions, 8, 10000.0)
    assert torch.equal(again[0], rope_angles(positions.T, 8, 10000.0)[0][:, :, None])
    assert SHARED.entries is None
    assert token_tables(positions, 8, 10000.0)[0] is not token_tables(positions, 8, 10000.0)[0]
