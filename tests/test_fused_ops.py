"""model/mlp.py's compiled SwiGLU on this machine's inductor (CPU): what autograd keeps, against
what the memory estimator counts (pipeline/memory/terms.py `swiglu`), and its values against
megatron's eager MLP. On GPU the same comparisons run in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.mlp import MLP

import model.mlp as mlp_module
from model import build_model, compile_limits
from pipeline.memory.estimate import Settings, estimate
from pipeline.memory.terms import element_bytes, layer_activation_terms
from tests.test_reference import small_args

ARGS = small_args(hidden_size=64, ffn_multiplier=4)
ROWS = 256


def _saved_bytes(fn) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves while `fn` runs, and its output."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_compiled_swiglu_keeps_two_ffn_widths_fewer_than_megatrons_ops_as_the_estimator_counts():
    block = build_model(ARGS, device="cpu").layers[0].mlp
    x = torch.randn(ROWS, 1, ARGS.hidden_size, requires_grad=True)
    eager, want = _saved_bytes(lambda: MLP.forward(block, x)[0])
    fused, got = _saved_bytes(lambda: block.linear_fc2(mlp_module._compiled_swiglu()(block.linear_fc1(x)[0]))[0])
    width = ROWS * block.config.ffn_hidden_size * 4  # one FFN-wide fp32 tensor
    assert eager - fused == 2 * width
    fp32 = element_bytes("autocast", "fp32")
    terms = {s: layer_activation_terms(ARGS, ROWS, 1, bytes_=fp32, swiglu=s)["mlp"] for s in ("eager", "fused")}
    assert terms["eager"] - terms["fused"] == 2 * width
    # the CPU runs megatron's ops whatever the setting
    assert layer_activation_terms(ARGS, ROWS, 1, bytes_=fp32, kernels="cpu", swiglu="fused")["mlp"] == terms["eager"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_an_unknown_swiglu_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="swiglu='triton'"):
        estimate(ARGS, Settings(seq_len=64, swiglu="triton"))


def test_pointwise_ops_keep_a_static_graph_per_training_shape_and_share_one_dynamic_graph_past_the_limit(
        monkeypatch):
    """model/compile_limits.py's Pointwise: the first STATIC_SHAPES shapes each get their own graph,
    every later shape the one dynamic graph, and a shape met first keeps its static graph after the
    dynamic one exists (a training length after an evaluation at other lengths). Values equal the
    eager function's throughout."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compile_limits, "STATIC_SHAPES", 2)
    op = compile_limits.Pointwise(mlp_module.swiglu)
    made = []
    for rows in (8, 12, 20, 28, 8, 12):  # two static, two past the limit (one dynamic graph), the first two again
        before = counters["stats"]["unique_graphs"]
        x = torch.randn(rows, 1, 16)
        torch.testing.assert_close(op(x), mlp_module.swiglu(x))
        made.append(counters["stats"]["unique_graphs"] - before)
    assert made == [1, 1, 1, 0, 0, 0]
    assert op.static_shapes == {((torch.Size([r, 1, 16]), torch.float32),) for r in (8, 12)}
    monkeypatch.setattr(compile_limits, "STATIC_SHAPES", 0)  # dynamic only, also for shapes seen before
    before = counters["stats"]["unique_graphs"]
    op(torch.randn(8, 1, 16))
    assert counters["stats"]["unique_graphs"] == before
