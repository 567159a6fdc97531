"""model/layer.py RowsAndResidual: the layer's output [head; y + a] without the cat's extra copy."""

import torch

from model.layer import RowsAndResidual


def _inputs(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((3, 2, 5), (7, 2, 5), (7, 2, 5))
    return [torch.randn(s, generator=g).to(d).requires_grad_() for s, d in zip(shapes, dtypes)]


def _grads(fn, inputs, d_out):
    out = fn(*inputs)
    out.backward(d_out)
    return out.detach(), [x.grad.clone() for x in inputs]


def test_matches_the_cat_of_the_sum_in_output_and_every_gradient():
    d_out = torch.randn(10, 2, 5, generator=torch.Generator().manual_seed(1))
    fused = _grads(RowsAndResidual.apply, _inputs([torch.float32] * 3), d_out)
    plain = _grads(lambda h, y, a: torch.cat([h, y + a]), _inputs([torch.float32] * 3), d_out)
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    for got, want in zip(fused[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fused[1][0].abs().sum() > 0 and not torch.equal(fused[1][0], d_out[:3] * 0)


def test_promotes_like_the_add_and_returns_gradients_in_each_input_dtype():
    head, y, a = _inputs([torch.bfloat16, torch.bfloat16, torch.float32])
    out = RowsAndResidual.apply(head, y, a)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[3:], y.float() + a, rtol=0, atol=0)
    out.sum().backward()
    assert (head.grad.dtype, y.grad.dtype, a.grad.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_gradcheck():
    inputs = [x.detach().double().requires_grad_() for x in _inputs([torch.float32] * 3)]
    assert torch.autograd.gradcheck(RowsAndResidual.apply, inputs)
