"""GPU checks (marked `gpu`; run on the GPU machine with `pytest -m gpu tests/test_gpu.py`).

They need CUDA: FlexAttention's block-mask path and bf16 autocast run only there.
"""

from __future__ import annotations

import pytest
import torch

from model import build_model
from tests.test_reference import small_args

pytestmark = pytest.mark.gpu


def _pair(args):
    torch.manual_seed(0)
    cpu = build_model(args, device="cpu")
    gpu = build_model(args, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("seq", [512, 700])
def test_flex_attention_path_matches_cpu_sdpa_in_fp32(seq):
    """FlexAttention's block mask (GPU) and the dense SDPA mask (CPU) are built from one
    mask function; in fp32 the two kernels agree to rounding (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    args = small_args(block_size=128, fam_len=16, mem_blocks=1, hidden_size=64, num_attention_heads=4)
    cpu, gpu = _pair(args)
    tokens = torch.randint(0, 64, (2, seq))
    ref = cpu(tokens, labels=tokens)
    out = gpu(tokens.cuda(), labels=tokens.cuda())
    assert (out.logits.cpu() - ref.logits).abs().max() <= 1e-4 * ref.logits.abs().max()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5


def test_bf16_loss_on_gpu_agrees_with_fp32_on_cpu():
    """bf16 keeps 8 bits of mantissa (relative 2^-8 ~ 0.4% per rounding); a few layers of
    rounding on a loss near ln(64) stay within 1%."""
    args = small_args(block_size=128, fam_len=16, mem_blocks=1, hidden_size=128, num_attention_heads=4, num_layers=4)
    cpu, gpu = _pair(args)
    tokens = torch.randint(0, 64, (4, 512))
    ref = cpu(tokens, labels=tokens).loss.item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu(tokens.cuda(), labels=tokens.cuda()).loss.item()
    print(f"loss cpu fp32 {ref:.5f} gpu bf16 {got:.5f}")
    assert abs(got - ref) / ref < 0.01
