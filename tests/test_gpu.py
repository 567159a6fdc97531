"""GPU checks (marked `gpu`; run on the GPU machine with `pytest -m gpu tests/test_gpu.py`).

They need CUDA: FlexAttention's block-mask kernels, the compiled fast FAM scan and bf16
autocast run only there. Each compares the GPU path with the CPU fp32 path (SDPA with the dense
mask, the eager per-step scan): logits and every gradient, per tensor, at tolerances that a
wrong mask or a missing FAM term exceeds (shown by a broken variant in the same file).
Every test builds its own shapes and leaves no setting behind, so any order passes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import model.compile_limits as compile_limits
import model.layer as layer_module
from model import build_model
from model.compile_limits import CompileLimitError
from model.masks import BlockLayout
from tests.test_reference import small_args

pytestmark = pytest.mark.gpu

# Three layers, grouped heads, one memory block; 700 tokens = 5 whole blocks (compiled scan
# steps) and a partial one (the same step uncompiled). init std 0.1 instead of 0.02: sharper
# attention, so the logits depend on what each query sees, not only on the embedding.
ARGS = small_args(block_size=128, fam_len=16, mem_blocks=1, hidden_size=64, num_attention_heads=4,
                  num_query_groups=2, num_layers=3, init_method_std=0.1)
SEQ = 700
# Relative error ||gpu - cpu|| / ||cpu|| of the logits and of each gradient, (logits, gradients).
# Measured on one H200 (torch 2.11): fp32 (TF32 off), the same math in another order (online
# softmax, fused kernels): logits 6.4e-7, worst gradient 1.5e-6 (fam_prompt). bf16 autocast
# (2^-9 relative per rounding, compounded over 3 layers and the backward): logits 9.6e-3, worst
# gradient 2.7e-2 (fam_prompt; norms and QKV ~2.2e-2). The bounds leave ~2x (bf16) and >10x
# (fp32). Hiding the FAM keys from the block queries (below) gave logits 0.44, fam_prompt 1.0.
TOLERANCE = {"fp32": (2e-5, 2e-5), "bf16": (2e-2, 5e-2)}


def _too_far(errors: dict[str, float], dtype: str) -> dict[str, float]:
    logits_bound, grad_bound = TOLERANCE[dtype]
    return {name: e for name, e in errors.items() if not e <= (logits_bound if name == "logits" else grad_bound)}


def _cpu_and_gpu_models():
    torch.manual_seed(0)
    cpu = build_model(ARGS, device="cpu")
    gpu = build_model(ARGS, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    assert all(layer.uses_fast_scan(torch.device("cuda")) for layer in gpu.layers)
    assert not any(layer.uses_fast_scan(torch.device("cpu")) for layer in cpu.layers)
    return cpu, gpu


def _logits_and_grads(model, device: str, dtype: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 64, (2, SEQ), generator=g), torch.randint(0, 64, (2, SEQ), generator=g)
    offset = torch.tensor([0.0, 1234.5])  # RPO: a different position offset per example
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(tokens.to(device), labels=labels.to(device), position_offset=offset.to(device))
    out.loss.backward()
    found = {"logits": out.logits.detach().float().cpu()}
    found.update({name: p.grad.float().cpu() for name, p in model.named_parameters()})
    return found


def _errors(got: dict, expected: dict) -> dict[str, float]:
    return {name: ((got[name] - ref).norm() / ref.norm()).item() for name, ref in expected.items()}


def _report(label: str, errors: dict[str, float]) -> None:
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:4]
    print(f"\n{label}: logits {errors['logits']:.2e}; worst " + ", ".join(f"{n} {e:.2e}" for n, e in worst))


@pytest.fixture
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_path_matches_cpu_fp32_logits_and_every_gradient(dtype, no_tf32):
    cpu, gpu = _cpu_and_gpu_models()
    errors = _errors(_logits_and_grads(gpu, "cuda", dtype), _logits_and_grads(cpu, "cpu", "fp32"))
    _report(f"GPU {dtype} vs CPU fp32", errors)
    assert len(errors) == 1 + len(list(cpu.parameters()))
    bad = _too_far(errors, dtype)
    assert not bad, bad


class _FAMKeysHidden(BlockLayout):
    """A wrong mask: block queries never see their FAM keys (as if the FAM term were missing)."""

    def mask_mod(self):
        visible, first, end = super().mask_mod(), self.mem_len, self.mem_len + self.fam_rows

        def hidden(b, h, q_idx, kv_idx):
            return visible(b, h, q_idx, kv_idx) & ((kv_idx < first) | (kv_idx >= end))

        return hidden


def test_a_wrong_mask_on_gpu_exceeds_even_the_bf16_tolerance(monkeypatch, no_tf32):
    cpu, gpu = _cpu_and_gpu_models()
    expected = _logits_and_grads(cpu, "cpu", "fp32")
    monkeypatch.setattr(layer_module, "BlockLayout", _FAMKeysHidden)
    errors = _errors(_logits_and_grads(gpu, "cuda", "bf16"), expected)
    _report("GPU bf16 with the FAM keys masked vs CPU fp32", errors)
    logits_bound, grad_bound = TOLERANCE["bf16"]
    assert errors["logits"] > 10 * logits_bound
    assert errors["fam_prompt"] > 10 * grad_bound
    assert len(_too_far(errors, "bf16")) > len(errors) // 2


def test_flex_attention_fails_loudly_past_its_shape_budget_instead_of_running_eagerly(monkeypatch):
    """Eager flex_attention would materialise the S x S scores (64 GiB at 64k tokens): past the
    budget a new shape must raise, never warn and fall back, whatever ran before in the process."""
    monkeypatch.setattr(compile_limits, "SHAPE_LIMIT", 1)
    attention = build_model(ARGS, device="cuda").layers[0].attention
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
        with pytest.raises(CompileLimitError, match="has been compiled for 1 different input shapes"), torch.no_grad():
            for seq in (384, 640):  # two shapes no other test uses: the second is past a budget of 1
                layout = BlockLayout(0, seq, ARGS.block_size, ARGS.fam_len, ARGS.mem_blocks)
                q = torch.randn(seq, 1, attention.heads, attention.head_dim, device="cuda")
                kv_shape = (layout.kv_len, 1, attention.groups, attention.head_dim)
                k, v = torch.randn(kv_shape, device="cuda"), torch.randn(kv_shape, device="cuda")
                attention.attend_blocks(q, k, v, layout)
