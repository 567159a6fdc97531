"""GPU checks (marked `gpu`; run on the GPU machine with `pytest -m gpu tests/test_gpu.py`).

They need CUDA: FlexAttention's block-mask kernels, the compiled fast FAM scan, its CUDA graphs
and bf16 autocast run only there. Each compares the GPU path with the CPU fp32 path (SDPA with
the dense mask, the eager per-step scan), or the captured scan with the uncaptured one: logits
and every gradient, per tensor, at tolerances that a wrong mask, a missing FAM term or a stale
graph buffer exceeds (shown by a broken variant in the same file).
Every test builds its own shapes and leaves no setting behind, so any order passes.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import model.compile_limits as compile_limits
import model.fast_scan as fast_scan_module
import model.layer as layer_module
import model.scan_buffers as scan_buffers
import model.scan_graphs as scan_graphs
import model.scan_step as scan_step
import model.split_attention as split_attention
from model import build_model
from model.fast_scan import fast_scan
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


def _cpu_and_gpu_models(overlap: bool):
    """overlap: model.overlap_fam_scan, the GPU's block attention in two parts with the scan beside
    the window part (model/split_attention.py), or one attention call after the scan."""
    torch.manual_seed(0)
    args = dataclasses.replace(ARGS, overlap_fam_scan=overlap)
    cpu = build_model(args, device="cpu")
    gpu = build_model(args, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    assert all(layer.uses_fast_scan(torch.device("cuda")) for layer in gpu.layers)
    assert all(layer.splits_attention(torch.device("cuda")) == overlap for layer in gpu.layers)
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


@pytest.mark.parametrize("overlap", [True, False], ids=["scan beside the window part", "one attention call"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_path_matches_cpu_fp32_logits_and_every_gradient(dtype, overlap, no_tf32):
    """Two GPU calls: the first runs the scan's loops and captures them, the second replays."""
    cpu, gpu = _cpu_and_gpu_models(overlap)
    expected = _logits_and_grads(cpu, "cpu", "fp32")
    for call in ("first call", "replay"):
        gpu.zero_grad(set_to_none=True)
        errors = _errors(_logits_and_grads(gpu, "cuda", dtype), expected)
        _report(f"GPU {dtype} ({call}, overlap {overlap}) vs CPU fp32", errors)
        assert len(errors) == 1 + len(list(cpu.parameters()))
        bad = _too_far(errors, dtype)
        assert not bad, (call, bad)


class _FAMKeysHidden(BlockLayout):
    """A wrong mask: block queries never see their FAM keys (as if the FAM term were missing)."""

    def mask_mod(self):
        visible, first, end = super().mask_mod(), self.mem_len, self.mem_len + self.fam_rows

        def hidden(b, h, q_idx, kv_idx):
            return visible(b, h, q_idx, kv_idx) & ((kv_idx < first) | (kv_idx >= end))

        return hidden


def test_a_wrong_mask_on_gpu_exceeds_even_the_bf16_tolerance(monkeypatch, no_tf32):
    cpu, gpu = _cpu_and_gpu_models(overlap=False)
    expected = _logits_and_grads(cpu, "cpu", "fp32")
    monkeypatch.setattr(layer_module, "BlockLayout", _FAMKeysHidden)
    errors = _errors(_logits_and_grads(gpu, "cuda", "bf16"), expected)
    _report("GPU bf16 with the FAM keys masked vs CPU fp32", errors)
    logits_bound, grad_bound = TOLERANCE["bf16"]
    assert errors["logits"] > 10 * logits_bound
    assert errors["fam_prompt"] > 10 * grad_bound
    assert len(_too_far(errors, "bf16")) > len(errors) // 2


def test_a_fam_part_that_shows_each_block_its_new_fam_exceeds_the_bf16_tolerance(monkeypatch, no_tf32):
    """The split attention's FAM part (model/split_attention.py) with block t seeing F_t, the FAM
    that has already read block t, instead of F_{t-1}: a leak of later tokens."""
    cpu, gpu = _cpu_and_gpu_models(overlap=True)
    expected = _logits_and_grads(cpu, "cpu", "fp32")

    class OwnFam(split_attention.FamPartLayout):  # a class of its own: the cached block masks are keyed by layout
        def mask_mod(self):
            C, F = self.block_size, self.fam_len
            return lambda b, h, q, kv: kv.div(F, rounding_mode="floor") == q.div(C, rounding_mode="floor") + 1

    monkeypatch.setattr(split_attention, "FamPartLayout", OwnFam)
    errors = _errors(_logits_and_grads(gpu, "cuda", "bf16"), expected)
    _report("GPU bf16, FAM part shows F_t vs CPU fp32", errors)
    assert errors["logits"] > 10 * TOLERANCE["bf16"][0]
    assert len(_too_far(errors, "bf16")) > len(errors) // 2


def test_flex_attention_fails_loudly_past_its_shape_budget_instead_of_running_eagerly():
    """Eager flex_attention would materialise the S x S scores (64 GiB at 64k tokens): past the
    budget a new shape must raise, never warn and fall back, whatever ran before in the process."""
    attention = build_model(ARGS, device="cuda").layers[0].attention
    with warnings.catch_warnings(), compile_limits.shape_limit(1):
        warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
        with pytest.raises(CompileLimitError, match="has been compiled for 1 different input shapes"), torch.no_grad():
            for seq in (384, 640):  # two shapes no other test uses: the second is past a budget of 1
                layout = BlockLayout(0, seq, ARGS.block_size, ARGS.fam_len, ARGS.mem_blocks)
                q = torch.randn(seq, 1, attention.heads, attention.head_dim, device="cuda")
                kv_shape = (layout.kv_len, 1, attention.groups, attention.head_dim)
                k, v = torch.randn(kv_shape, device="cuda"), torch.randn(kv_shape, device="cuda")
                attention.attend_blocks(q, k, v, layout)


# Captured vs uncaptured scan, fp32: the same compiled steps in the same order, so they differ at
# most by the matrix products' algorithm choice (fp32 reassociation, ~1e-7 relative). 1e-5 is
# still 2x under the GPU-vs-CPU fp32 bound above; a stale static buffer (the broken variant
# below) is off by order 1.
CAPTURE_TOLERANCE = 1e-5


def scan_call(layer, from_prompt: bool, seq: int, seed: int, dtype=torch.float32, bf16_inputs: bool = False):
    """One layer's fast scan on random inputs (from the prompt, or from a passed-in FAM; in dtype,
    bf16-representable with bf16_inputs): (its outputs, a random projection of them, the inputs
    by name: FAM0, K, V and the weights)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    config, b, att = layer.config, 2, layer.attention
    F = config.fam_len
    rounded = torch.bfloat16 if bf16_inputs else dtype

    def new(*shape):
        return torch.randn(shape, device="cuda", generator=g).to(rounded).to(dtype).requires_grad_()

    fam0 = new(F, b, config.hidden_size)
    k, v = (new(seq, b, att.groups, att.head_dim) for _ in "kv")
    positions = torch.arange(seq, device="cuda", dtype=torch.float32).expand(b, -1) + 100.0
    weights = layer._scan_weights()
    spec = layer._scan_spec(from_prompt, BlockLayout(0, seq, config.block_size, F, config.mem_blocks).fam_rows)
    outputs = [x for x in fast_scan(spec, fam0, k, v, layer._fam_rope(positions), weights) if x is not None]
    loss = sum((x.float() * torch.randn(x.shape, device="cuda", generator=g)).sum() for x in outputs)
    inputs = {"fam0": fam0, "k": k, "v": v, **dict(zip(("n1", "qkv", "proj", "n2", "fc1", "fc2"), weights))}
    return outputs, loss, inputs


def _scan_outputs_and_grads(layer, from_prompt: bool, seq: int, seed: int, dtype=torch.float32,
                            bf16_inputs: bool = False) -> dict:
    """`scan_call`'s outputs and the gradients of its projection w.r.t. its inputs."""
    outputs, loss, inputs = scan_call(layer, from_prompt, seq, seed, dtype, bf16_inputs)
    grads = torch.autograd.grad(loss, list(inputs.values()))
    found = {f"output {i}": x.detach() for i, x in enumerate(outputs)}
    found.update({f"grad {name}": grad for name, grad in zip(inputs, grads)})
    return found


# Flash vs matrix-product steps in bf16 (model/scan_step.py `uses_flash`), each against the same
# layer in fp32 (bf16-representable weights and inputs). Measured on one H200 (torch 2.11): flash vs
# matrix products differ by up to 2.3e-2 (both round in bf16, in different places), as much as
# either differs from fp32. So the bound is relative to the matrix products' own error. A backward
# handed a wrong log-sum-exp (zero: p = exp(s), unnormalised) must be off by far more.
FLASH_FACTOR = 1.5


def kernels_launched(run) -> tuple[list, list[str]]:
    """run()'s result, and the name of each CUDA kernel it launched (one per launch)."""
    scan_graphs.clear()
    torch._dynamo.reset()  # the steps recompile for the setting under test
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        found = run()
        torch.cuda.synchronize()
    return found, [e.name for e in prof.events()]


def _flash_kernels(run) -> tuple[list, int]:
    """run()'s result, and the number of flash-attention kernels it launched."""
    found, names = kernels_launched(run)
    return found, sum("flash" in name.lower() for name in names)


def _worst_error(got: list, want: list) -> float:
    return max(max(_errors(a, b).values()) for a, b in zip(got, want))


def bf16_layer_and_fp32_twin(args):
    """Layer 1 of a bf16 model, and of an fp32 model with the same (bf16-representable) weights."""
    model, fp32 = build_model(args, device="cuda").to(torch.bfloat16), build_model(args, device="cuda")
    fp32.load_state_dict(model.state_dict())
    return model.layers[1], fp32.layers[1]


def scans(layer, dtype):
    """A closure: the layer's scan outputs and gradients (bf16-representable inputs), from the prompt and from a
    passed-in FAM."""
    return lambda: [_scan_outputs_and_grads(layer, p, SEQ, 3, dtype, bf16_inputs=True) for p in (True, False)]


def lse_zeroed(backward):
    """A fused attention backward handed a log-sum-exp of zeros (p = exp(s), unnormalised): a broken variant."""
    return lambda d_ctx, q, kh, vh, ctx, lse, head_dim: backward(d_ctx, q, kh, vh, ctx, lse * 0, head_dim)


def test_flash_scan_steps_are_as_close_to_fp32_as_the_matrix_product_steps(monkeypatch, no_tf32):
    """A bf16 layer's fast scan over 700 tokens (5 whole blocks: flash attention; a partial last
    one: the matrix products), from the prompt and from a passed-in FAM: outputs and the gradients
    of FAM0, K, V and every weight, with flash on and off, against the fp32 layer."""
    layer, reference = bf16_layer_and_fp32_twin(ARGS)
    want, _ = _flash_kernels(scans(reference, torch.float32))
    runs = {}
    for name, flash in (("matmul", False), ("flash", True)):
        monkeypatch.setattr(scan_step, "FLASH", flash)
        runs[name] = _flash_kernels(scans(layer, torch.bfloat16))
    errors = {name: _worst_error(found, want) for name, (found, _) in runs.items()}
    print(f"\nbf16 scan vs fp32, worst output or gradient: {errors}; flash kernels "
          f"{ {name: count for name, (_, count) in runs.items()} }")
    assert runs["matmul"][1] == 0 and runs["flash"][1] > 0
    assert len(want[0]) >= 12 and errors["flash"] <= FLASH_FACTOR * errors["matmul"], errors
    monkeypatch.setattr(scan_step, "_flash_backward", lse_zeroed(scan_step._flash_backward))
    broken, _ = _flash_kernels(scans(layer, torch.bfloat16))
    assert _worst_error(broken, want) > 10 * FLASH_FACTOR * errors["matmul"], _worst_error(broken, want)
    scan_graphs.clear()


@pytest.mark.parametrize("in_place", [True, False])
def test_captured_scan_equals_uncaptured_and_replays_new_weights_and_inputs(in_place, monkeypatch, no_tf32):
    """The CUDA graphs of model/scan_graphs.py against the same compiled steps run uncaptured:
    from the prompt and from a passed-in FAM, 700 tokens (5 whole blocks and a partial one).
    Layer A's first call captures, its second replays; layer B (other weights) with other inputs
    must get B's results, not A's. With the weights read in place (fp32 is the GEMM dtype here,
    as bf16 is under bf16-mixed) each layer has its own graphs, and a replay after an in-place
    update of A's weights (as the optimizer's) must see the new values; with the weights copied in,
    B replays A's graphs over the shared buffers. Broken variants: B replaying A's graphs read in
    place, or a buffer left with A's weights, go red."""
    monkeypatch.setattr(fast_scan_module, "WEIGHTS_IN_PLACE", in_place)
    model = build_model(ARGS, device="cuda")
    layers = [model.layers[0], model.layers[2]]  # A and B: different weights
    cases = [(layer, from_prompt, seed) for layer, seed in zip(layers, (1, 2)) for from_prompt in (True, False)]
    monkeypatch.setattr(scan_graphs, "MODE", "off")
    expected = [_scan_outputs_and_grads(layer, p, SEQ, seed) for layer, p, seed in cases]
    monkeypatch.setattr(scan_graphs, "MODE", "cuda")
    scan_graphs.clear()
    for layer, p, seed in cases[:2]:
        _scan_outputs_and_grads(layer, p, SEQ, seed)  # runs directly, then captures
    loops = [loop for scan in scan_graphs._CACHE.values() for loop in scan.loops.values()]
    assert len(loops) == 4 and all(loop.graph is not None for loop in loops)
    for name, (layer, p, seed), want in zip(("A from prompt", "A from state", "B from prompt", "B from state"),
                                            cases, expected):
        errors = _errors(_scan_outputs_and_grads(layer, p, SEQ, seed), want)
        _report(f"captured vs uncaptured scan, {name}", {"logits": errors["output 0"], **errors})
        bad = {n: e for n, e in errors.items() if not e <= CAPTURE_TOLERANCE}
        assert len(errors) >= 12 and not bad, (name, bad)
    (a_layer, _, a_seed), (b_layer, _, b_seed) = cases[0], cases[2]
    if in_place:  # A's weights updated in place: its replay reads the new values
        with torch.no_grad():
            for w in a_layer._scan_weights():
                w.mul_(1.25)
        monkeypatch.setattr(scan_graphs, "MODE", "off")
        want = _scan_outputs_and_grads(a_layer, True, SEQ, a_seed)
        monkeypatch.setattr(scan_graphs, "MODE", "cuda")
        errors = _errors(_scan_outputs_and_grads(a_layer, True, SEQ, a_seed), want)
        assert not {n: e for n, e in errors.items() if not e <= CAPTURE_TOLERANCE}, errors
    _scan_outputs_and_grads(a_layer, True, SEQ, a_seed)  # A's weights in the buffers, or A's graphs the last used
    if in_place:  # the broken variant: loops not told apart by the weights' addresses
        monkeypatch.setattr(scan_graphs, "weights_key", lambda weights: ())
        scan_graphs.clear()
        _scan_outputs_and_grads(a_layer, True, SEQ, a_seed)  # captures A's graphs under the one key
    else:  # the broken variant: weights not copied in any more
        copy_into = scan_buffers.copy_into
        monkeypatch.setattr(scan_buffers, "copy_into", lambda buffers, values: copy_into(
            buffers, {n: x for n, x in values.items() if n != "weights"}))
    errors = _errors(_scan_outputs_and_grads(b_layer, True, SEQ, b_seed), expected[2])
    _report("captured scan with stale weights, B from prompt", {"logits": errors["output 0"], **errors})
    assert errors["output 0"] > 1e4 * CAPTURE_TOLERANCE and errors["grad qkv"] > 1e4 * CAPTURE_TOLERANCE
    scan_graphs.clear()


@pytest.mark.parametrize("shapes", [10_000, 0])  # compile_limits.STATIC_SHAPES: static, dynamic only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_split_and_rope_equal_the_eager_ops_forward_and_backward(dtype, shapes, no_tf32, monkeypatch):
    """model/rope.py's compiled split + RoPE against its eager ops on the same GPU: q, k, v and the
    gradient of the QKV output, at two lengths (compiled for each shape, or for dynamic shapes only;
    dynamo may reuse a graph another test compiled) and per-example positions. The
    same fp32 math fused: equal up to one rounding (fp32) or one bf16 step where a product and sum
    fuse into an FMA. Rotating by the wrong sign of sin gives errors of order 1."""
    import model.rope as rope

    monkeypatch.setattr(compile_limits, "STATIC_SHAPES", shapes)

    def run(fused: bool, mixed, positions, flip_sin: bool = False):
        m = mixed.clone().requires_grad_()
        angles = rope.rope_angles
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rope, "FUSED", fused)
            if flip_sin:
                patch.setattr(rope, "rope_angles", lambda *a: (angles(*a)[0], -angles(*a)[1]))
            q, k, v = rope.split_qkv_rope(m, positions, positions + 0.5, 10000.0)
        g = torch.Generator(device="cuda").manual_seed(1)
        sum((x.float() * torch.randn(x.shape, device="cuda", generator=g)).sum() for x in (q, k, v)).backward()
        return {"q": q, "k": k, "v": v, "grad": m.grad}

    bound = 1e-6 if dtype == torch.float32 else 2 ** -7
    for s in (700, 1024):
        mixed = torch.randn(s, 2, 3, 5, 64, device="cuda").to(dtype)  # 3 groups of 3 query heads, k, v
        positions = torch.arange(s, device="cuda", dtype=torch.float32) + torch.tensor([[0.0], [1234.5]], device="cuda")
        eager, fused = run(False, mixed, positions), run(True, mixed, positions)
        errors = {n: ((fused[n].float() - eager[n].float()).norm() / eager[n].float().norm()).item() for n in eager}
        assert all(e <= bound for e in errors.values()), (s, errors)
        flipped = run(True, mixed, positions, flip_sin=True)
        assert ((flipped["q"].float() - eager["q"].float()).norm() / eager["q"].float().norm()).item() > 0.1


@pytest.mark.parametrize("shapes", [10_000, 0])  # compile_limits.STATIC_SHAPES: static, dynamic only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_equals_megatrons_mlp_forward_and_backward(dtype, shapes, no_tf32, monkeypatch):
    """model/mlp.py's compiled SwiGLU against megatron's own MLP.forward (its eager ops) on the same
    GPU and weights: the output and the gradients of the input, fc1 and fc2, at two lengths
    (static or dynamic shapes, as above). fp32: equal up to rounding; bf16: the fused kernel rounds once where the eager
    ops round after silu and after the product. Swapping gate and up (a wrong chunk order) is
    far outside the bound."""
    import model.mlp as mlp_module

    monkeypatch.setattr(compile_limits, "STATIC_SHAPES", shapes)
    model = build_model(ARGS, device="cuda").to(dtype)
    block = model.layers[0].mlp
    assert isinstance(block, mlp_module.FAMMLP)

    def run(fused: bool, x, swap: bool = False):
        block.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mlp_module, "FUSED", fused)
            if swap:
                patch.setattr(mlp_module, "_compiled_swiglu", lambda: lambda h: mlp_module.swiglu(
                    torch.cat(h.chunk(2, dim=-1)[::-1], dim=-1)))
            out, _ = block(x)
        g = torch.Generator(device="cuda").manual_seed(1)
        (out.float() * torch.randn(out.shape, device="cuda", generator=g)).sum().backward()
        return {"out": out, "x": x.grad, "fc1": block.linear_fc1.weight.grad, "fc2": block.linear_fc2.weight.grad}

    bound = 1e-6 if dtype == torch.float32 else 2 ** -6  # bf16 on CPU's inductor: 3.6e-3
    for s in (700, 1024):
        x = torch.randn(s, 2, ARGS.hidden_size, device="cuda").to(dtype)
        eager, fused = run(False, x), run(True, x)
        errors = {n: ((fused[n].float() - eager[n].float()).norm() / eager[n].float().norm()).item() for n in eager}
        assert all(e <= bound for e in errors.values()), (s, errors)
        swapped = run(True, x, swap=True)
        assert ((swapped["out"].float() - eager["out"].float()).norm() / eager["out"].float().norm()).item() > 0.1
