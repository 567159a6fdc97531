"""pipeline.memory: the estimate against what the model really saves and allocates.

CPU: autograd's saved tensors of the real model on the training path (return_logits=False,
saved_tensors_hooks, deduplicated by storage) against the activation terms, with the loss in one
chunk and in many, and the GPU's fast FAM scan run on CPU against its terms; parameter/gradient/
Adam bytes of a real tiny model; ZeRO and pipeline rules; every recipe fits; impossible
combinations raise. GPU (marked `gpu`): the estimate beside
torch.cuda.max_memory_allocated of real training steps.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import build_model, language_model, load_model_args
from model.config import ModelArgs, read_config_tree
from pipeline.memory.estimate import GIB, Settings, estimate
from pipeline.memory.cli import estimate_config
from pipeline.memory.terms import (
    element_bytes,
    embedding_saved_bytes,
    head_bytes,
    fam_rope_table_bytes,
    layer_activation_terms,
    layer_held_bytes,
    rope_table_bytes,
    stage_params,
)
from tests.time_bounds import HANG_GUARD_SECONDS
from tests.trained_checkpoints import run_in_process

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "recipes"
# recipe -> (nodes, GPUs per node) it is written for (its header's slurm.submit line)
RECIPE_SHAPES = {"fam-1b-8x80gb": (1, 8), "fam-8b-8x80gb": (4, 8), "fam-24b-8x80gb": (4, 8), "fam-24b-4x80gb": (1, 4)}
# torch.cuda.max_memory_allocated of test_estimate_within_15pct_of_measured_peak_on_gpu's steps
# (the training path: autocast, return_logits=False, fused AdamW, micro-batch 1, two steps, the
# first building the block mask): (config, seq_len, recompute, vocab, micro-batches per step, GiB,
# card). Measured on one H200 after the chunked loss, copied memory K/V and blockwise mask
# build; the estimate is within -3.3%..+2.9% of each (under at fam-1b 8k, where the fast scan's
# static buffers, model/scan_graphs.py, are not counted). It was +11.4 % at 64k with recompute while
# a layer's backward counted four FFN-wide gradients at once (two now, pipeline/memory/estimate.py).
# The FAM scan's settings of every peak measured before 2026-12: layer recompute ran the scan again,
# and the block attention was one call after the scan (the defaults since keep the scan's rows and
# split the attention beside it: model/scan_stash.py, model/split_attention.py).
# Every row but the first was measured while the fast scan saved k and v (whose view kept the QKV output)
# beside its FAM K/V (Settings.scan_keys "block"). The first was measured again on 2026-12-01 on commit c4465ab,
# where it saves the block attention's joined K/V (39.39 GiB, was 42.34; `benchmarks.train_step --precision
# bf16-autocast --eager-ops --recompute off`, benchmarks/results/2026-12-01-1xH200, call s16-b).
SCAN_AS_MEASURED = dict(recompute_fam_scan=True, overlap_fam_scan=False)
MEASURED_WITH_JOINED_KEYS = {("fam-1b", 8192, False, 32000)}

GPU_PEAKS = [
    ("fam-1b", 8192, False, 32000, 1, 39.39, "H200"),
    ("fam-1b", 8192, False, 256000, 1, 51.35, "H200"),
    ("bswa-1b", 8192, False, 32000, 2, 43.07, "H200"),
    ("dense-1b", 8192, False, 32000, 1, 38.64, "H200"),
    ("fam-1b", 16384, True, 32000, 1, 22.90, "H200"),
    ("fam-1b", 32768, True, 32000, 1, 26.40, "H200"),
    ("fam-1b", 65536, True, 32000, 1, 35.62, "H200"),
    ("bswa-1b", 65536, True, 32000, 1, 34.68, "H200"),
    ("dense-1b", 65536, True, 32000, 1, 34.74, "H200"),
    ("fam-1b", 65536, True, 256000, 1, 44.59, "H200"),
    ("bswa-1b", 32768, False, 32000, 1, 105.65, "H200"),
    ("dense-1b", 32768, False, 32000, 1, 108.71, "H200"),
]
FP32 = element_bytes("autocast", "fp32")


def _small(**over) -> ModelArgs:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_multiplier=4,
                vocab_size=256, block_size=32, mem_blocks=1, fam_len=8)
    return ModelArgs(**{**base, **over})


def _saved_bytes(args: ModelArgs, batch: int, seq: int, fast_scan: bool = False,
                 dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded), and of
    those, the bytes first saved inside a layer's FAM scan. `fast_scan`: the GPU's scan
    (model/fast_scan.py) run on CPU, as tests/test_scan.py does."""
    import model.layer as layer_module

    torch.manual_seed(0)
    model = build_model(args, params_dtype=dtype, device="cpu")
    for layer in model.modules():
        if isinstance(layer, layer_module.FAMLayer):
            layer.use_fast_scan = fast_scan
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    in_scan, scan_storages = [False], set()
    scans = {name: getattr(layer_module, name) for name in ("eager_scan", "fast_scan")}

    def flagged(real):
        def scan(*args):
            in_scan[0] = True
            try:
                return real(*args)
            finally:
                in_scan[0] = False

        return scan

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = storage.nbytes()
            if in_scan[0]:
                scan_storages.add(storage.data_ptr())
        return t

    with pytest.MonkeyPatch.context() as patch:
        for name, real in scans.items():
            patch.setattr(layer_module, name, flagged(real))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
    return sum(storages.values()), sum(storages[p] for p in scan_storages)


def _predicted_saved(args: ModelArgs, batch: int, seq: int) -> int:
    """The estimator's saved bytes for a one-stage fp32 CPU model (layers, head, embedding)."""
    F = args.fam_len if args.uses_fam else 0
    layer_input = (F + seq) * batch * args.hidden_size * 4
    if args.recompute:
        layers = (args.num_layers + 1) * layer_input + seq * batch * 4
    else:
        layers = args.num_layers * sum(layer_activation_terms(args, seq, batch, bytes_=FP32, kernels="cpu").values())
        layers += layer_input + rope_table_bytes(args, seq, batch)  # the layers share one forward's RoPE tables
    return layers + head_bytes(args, seq, batch, bytes_=FP32, kernels="cpu").saved + embedding_saved_bytes(seq, batch)


CASES = [
    ("fam", {}, 2, 96),
    ("fam, loss in 12 checkpointed chunks", dict(loss_chunk_elements=2**12), 2, 96),
    ("fam, loss in one chunk of 64 tokens", dict(loss_chunk_elements=2**15), 2, 64),
    ("fam, partial last block", {}, 2, 100),
    ("fam, 3 memory blocks", dict(hidden_size=128, block_size=64, fam_len=16, mem_blocks=3), 1, 512),
    ("fam, multi-query", dict(num_query_groups=1), 1, 128),
    ("bswa", dict(fam_len=0), 2, 128),
    ("dense", dict(attention="dense", fam_len=0), 2, 96),
    ("fam, recompute", dict(recompute=True), 2, 96),
    ("dense, recompute", dict(attention="dense", fam_len=0, recompute=True), 2, 96),
]
# The estimate leaves out a few tiny tensors (measured: 16 bytes in every case, e.g. the loss's
# scalars); anything it could drop or miscount is at least one F-row tensor, F*b*h*4 >= 4 KiB here.
UNMODELLED_BYTES = 64


@pytest.mark.parametrize("name, over, batch, seq", CASES)
def test_activation_terms_equal_autograd_saved_tensors_of_the_cpu_model(name, over, batch, seq, monkeypatch):
    """The CPU fp32 model's real saved tensors against the estimate (pipeline/memory/estimate.py,
    Calibration), the eager FAM scan (model/scan.py) included: its T block steps and the
    soft-prompt stream's step (commit 523c99c), whose bytes must equal the fam_scan term exactly.
    The block attention's keys are the FAM keys padded to a tile, then the tokens (model/masks.py).
    Checkpointed loss chunks save nothing through the hooks; the final norm's output they keep as
    their input is what the norm saves anyway. A loss of one chunk is not checkpointed: its
    softmax is saved. Recompute saves no layer internals, the scan's included."""
    over = dict(over)
    chunk = over.pop("loss_chunk_elements", None)
    if chunk:  # the estimate reads the same constant
        monkeypatch.setattr(language_model, "LOSS_CHUNK_ELEMENTS", chunk)
    args = _small(**over)
    got, scan = _saved_bytes(args, batch, seq)
    assert abs(_predicted_saved(args, batch, seq) - got) <= UNMODELLED_BYTES, (name, got)
    terms = layer_activation_terms(args, seq, batch, bytes_=FP32, kernels="cpu")
    shared = fam_rope_table_bytes(args, seq, batch)  # the layers' scans share one forward's FAM RoPE tables
    assert scan == (0 if args.recompute else args.num_layers * terms.get("fam_scan", 0) + shared), (name, scan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, over, batch, seq", [c for c in CASES if c[0] in ("fam", "fam, partial last block",
                                                                                   "fam, multi-query")])
def test_gpu_scan_terms_equal_the_fast_scans_saved_tensors_run_on_cpu(name, over, batch, seq, dtype):
    """kernels="cuda" counts model/fast_scan.py's saved tensors: its inputs (block K/V, which keep
    the QKV output alive), the FAM K/V, the RoPE tables and each step's Activations, prompt step
    included. The same code runs on CPU (FAMLayer.use_fast_scan, as tests/test_scan.py), fresh
    buffers instead of CUDA graphs' static ones, whose per-layer clones have the same sizes. fp32,
    and a bf16 model (precision bf16-zero: bf16 GEMM inputs and attention operands, fp32 `a`), the
    dtypes the GPU's autocast gives the GEMMs; CPU cannot show the CUDA graphs or compiled steps."""
    args = _small(**over)
    got, scan = _saved_bytes(args, batch, seq, fast_scan=True, dtype=dtype)
    e = FP32 if dtype == torch.float32 else element_bytes("bf16-zero", "bf16")
    scans = args.num_layers * layer_activation_terms(args, seq, batch, bytes_=e, kernels="cuda")["fam_scan"]
    assert scan == scans + fam_rope_table_bytes(args, seq, batch)  # + one forward's FAM RoPE tables, shared


def test_weight_gradient_and_adam_bytes_equal_the_tiny_models():
    args = load_model_args("tiny")
    model = build_model(args, device="cpu")
    tokens = torch.randint(0, args.vocab_size, (1, 257))
    model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    est = estimate(args, Settings(seq_len=256, dtype="fp32", kernels="cpu")).ranks[0]
    params = list(model.parameters())
    assert est.params == sum(p.numel() for p in params) == args.num_params(embeddings=True)
    assert est.weights == sum(p.numel() * p.element_size() for p in params)
    assert est.gradients == sum(p.grad.numel() * p.grad.element_size() for p in params)
    adam = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert est.optimizer == adam


def test_pipeline_stages_hold_embedding_first_and_output_layer_last():
    args = load_model_args("tiny")
    from pipeline.parallel.stages import build_stages, split_layers

    chunks = split_layers(args.num_layers, 2)
    for rank, layers in enumerate(chunks):
        ((_, stage),) = build_stages(args, rank, 2, device="cpu")
        assert list(stage.part.layer_range) == list(layers)
        assert sum(p.numel() for p in stage.parameters()) == stage_params(args, len(layers), rank == 0, rank == 1)
    est = estimate(args, Settings(pp=2, seq_len=256))
    assert [r.layers for r in est.ranks] == [len(c) for c in chunks]
    assert sum(r.params for r in est.ranks) == args.num_params(embeddings=True)


@pytest.mark.parametrize("precision, param, grad, optim", [("autocast", 4, 4, 8), ("bf16-zero", 2, 2, 12)])
def test_zero_stages_divide_optimizer_then_gradients_then_weights_by_dp(precision, param, grad, optim):
    args, dp = load_model_args("fam-1b"), 4
    n = estimate(args).ranks[0].params
    for zero in range(4):
        r = estimate(args, Settings(dp=dp, zero=zero, precision=precision)).ranks[0]
        assert r.weights == n * param // (dp if zero == 3 else 1)
        assert r.gradients == n * grad // (dp if zero >= 2 else 1)
        assert r.optimizer == n * optim // (dp if zero >= 1 else 1)
        assert (r.zero_buffers > 0) == (zero > 0)
    off = estimate(args, Settings(dp=dp, zero=3, precision=precision, offload_optimizer=True)).ranks[0]
    fp32_grad_partition = n * 4 // dp if precision == "bf16-zero" else 0
    # ZeRO-3 offload also keeps the reduced gradient partition on the host (DeepSpeed's stage 3).
    assert off.optimizer == 0 and off.gradients == 0
    assert off.optimizer_host == n * optim // dp + fp32_grad_partition + n * grad // dp


def test_pipeline_in_flight_micro_batches_follow_the_schedule():
    args = load_model_args("fam-1b")
    est = estimate(args, Settings(pp=3, microbatches=8, recompute=False))
    assert [r.in_flight for r in est.ranks] == [3, 2, 1]  # 1F1B: P - rank
    assert est.ranks[0].activations > 2.5 * est.ranks[2].activations
    gpipe = estimate(args, Settings(pp=3, microbatches=8, schedule="gpipe"))
    assert [r.in_flight for r in gpipe.ranks] == [8, 8, 8]
    inter = estimate(args, Settings(pp=3, virtual_stages=2, microbatches=6))  # (2(P-1) + (v-1)P + 1) / v
    assert inter.ranks[0].in_flight == (2 * 2 + 3 + 1) / 2


def test_recompute_keeps_only_layer_inputs():
    args = load_model_args("fam-1b", vocab_size=32000, recompute_fam_scan=True)
    full = estimate(args, Settings(seq_len=8192, recompute=False)).ranks[0]
    rec = estimate(args, Settings(seq_len=8192, recompute=True)).ranks[0]
    layer_input = (64 + 8192) * 1536 * 4
    assert rec.activations == 19 * layer_input + 8192 * 4 + embedding_saved_bytes(8192, 1)
    assert full.activations > 10 * rec.activations


def test_fam_state_holds_the_last_m_blocks_not_the_sequence():
    """model/layer.py copies the last m blocks' K/V: the state no longer grows with S."""
    args = load_model_args("fam-1b")
    short, long = layer_held_bytes(args, 8192, 1), layer_held_bytes(args, 65536, 1)
    assert short == long == 64 * 1536 * 4 + 2 * 3 * 1024 * args.query_groups * args.head_dim * 2


def test_chunked_loss_keeps_one_chunk_of_logits_not_all():
    args = load_model_args("fam-1b")  # vocabulary 256000
    chunked = head_bytes(args, 65536, 1)
    whole = head_bytes(args, 65536, 1, return_logits=True)
    chunk_logits = language_model.LOSS_CHUNK_ELEMENTS // 256000 * 256000
    assert chunked.forward == chunk_logits * 6 + 256000 * 1536 * 2  # bf16 + fp32 logits, bf16 weight copy
    assert chunked.saved == 65536 * (4 + 1536 * 4)  # the final norm only
    assert whole.saved > 60 * GIB > 20 * chunked.saved


def test_sequence_parallel_shards_inputs_norms_and_fam_rows_by_tp():
    args = load_model_args("fam-8b")
    plain = layer_activation_terms(args, 8192, 1, tp=8)
    sp = layer_activation_terms(args, 8192, 1, tp=8, sequence_parallel=True)
    assert sp["input"] * 8 == plain["input"] and sp["norms"] * 8 == plain["norms"]
    assert sp["attention"] == plain["attention"] and sp["mlp"] == plain["mlp"]
    assert plain["fam_scan"] > sp["fam_scan"]
    fam_rows = 64 * 4096 * 4
    assert layer_held_bytes(args, 8192, 1, 8) - layer_held_bytes(args, 8192, 1, 8, True) == fam_rows - fam_rows // 8


@pytest.mark.parametrize("name, seq, recompute, vocab, microbatches, measured_gib, card",
                         [c for c in GPU_PEAKS if c[5] is not None])
def test_estimate_within_5pct_of_measured_gpu_peaks(name, seq, recompute, vocab, microbatches, measured_gib, card):
    """Tighter than the project's 15 % bar, so that it can fail: four FFN-wide gradients in a
    layer's backward instead of two put the recompute rows 7-11 % over."""
    args = load_model_args(name, vocab_size=vocab, **SCAN_AS_MEASURED)
    # measured before 2026-12, with megatron's eager SwiGLU (model/mlp.py: five FFN-wide tensors kept, not three)
    # and each layer's own RoPE tables (before session 22)
    keys = "joined" if (name, seq, recompute, vocab) in MEASURED_WITH_JOINED_KEYS else "block"
    est = estimate(args, Settings(seq_len=seq, recompute=recompute, microbatches=microbatches, swiglu="eager",
                                  scan_keys=keys, rope_tables="per-layer"))
    assert abs(est.peak / GIB - measured_gib) / measured_gib < 0.05, (est.peak / GIB, est.worst().peaks)


@pytest.mark.parametrize("recipe", sorted(RECIPE_SHAPES))
def test_every_recipe_fits_its_80gb_gpus(recipe):
    path = RECIPES / f"{recipe}.yaml"
    tree = read_config_tree(path)
    nodes, gpus = RECIPE_SHAPES[recipe]
    par = tree["parallel"]
    dp = nodes * gpus // (par["tensor_parallel_size"] * par["pipeline_parallel_size"])
    assert nodes * gpus == dp * par["tensor_parallel_size"] * par["pipeline_parallel_size"]
    assert tree["data"]["seq_len"] == 8192
    est = estimate_config(path, dp=dp)
    assert est.fits(80.0), est.worst().peaks


PASSKEY_RECIPES = ("passkey-bswa", "passkey-fam")  # one GPU each, 1k tokens (benchmarks/passkey_repro.py)


@pytest.mark.parametrize("recipe", PASSKEY_RECIPES)
def test_passkey_recipes_fit_one_80gb_gpu(recipe):
    assert estimate_config(RECIPES / f"{recipe}.yaml", dp=1).fits(80.0)


LONG_RECIPES = ("fam-1b-1m-1x80gb", "fam-1b-1m-pp2")  # 1,048,576-token sequences in micro-chunks (issue 14)


@pytest.mark.parametrize("recipe", LONG_RECIPES)
def test_long_context_recipes_fit_their_80gb_gpus_in_micro_chunks(recipe):
    est = estimate_config(RECIPES / f"{recipe}.yaml", dp=1)
    assert est.settings.seq_len == 1048576 and est.settings.micro_chunk_len == 16384
    assert est.fits(80.0), est.worst().peaks


def test_recipe_folder_has_exactly_the_tested_recipes():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted([*RECIPE_SHAPES, *PASSKEY_RECIPES, *LONG_RECIPES])


def test_command_line_prints_the_table_and_exits_zero_when_it_fits(capsys):
    out = subprocess.run([sys.executable, "-m", "pipeline.memory", "--config", str(RECIPES / "fam-24b-8x80gb.yaml"),
                          "--dp", "4"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert out.returncode == 0, out.stderr
    assert "rank 7 (6 layers)" in out.stdout and "fits: peak" in out.stdout
    bad = run_in_process("pipeline.memory.cli", ["--config", "fam-24b", "--tp", "2"], capsys)  # no second import
    assert bad.returncode == 2 and "num_query_groups" in bad.stderr


def test_a_model_value_of_the_wrong_type_is_refused_by_name_as_in_training(tmp_path):
    """The estimate reads the model section as the training config does: `recompute_fam_scan: maybe`
    was once taken as true here while training refused it."""
    path = tmp_path / "bad.yaml"
    path.write_text("base: fam-1b.yaml\nmodel:\n  recompute_fam_scan: maybe\n")
    with pytest.raises(ValueError, match=r"bad.yaml: model.recompute_fam_scan='maybe': expected bool"):
        estimate_config(path)
    path.write_text("base: fam-1b.yaml\nmodel:\n  init_method_std: 2e-2\n")  # YAML 1.1 reads a string
    assert estimate_config(path).peak > 0


@pytest.mark.parametrize("config, kwargs, words", [
    ("fam-1b", dict(tp=5), "num_attention_heads"),
    ("fam-24b", dict(tp=2), "num_query_groups"),
    ("fam-1b", dict(pp=4), "pipeline_layout"),
    ("fam-1b", dict(pp=3, virtual_stages=4, schedule="interleaved_1f1b"), "pipeline chunks"),
    ("fam-1b", dict(pp=2, zero=2), "zero_stage=2"),
    ("fam-1b", dict(pp=2, zero=3), "zero_stage=3"),
    ("fam-1b", dict(offload_optimizer=True), "offload_optimizer"),
    ("fam-1b", dict(sequence_parallel=True), "sequence_parallel"),
    ("fam-1b", dict(pp=2, virtual_stages=3, schedule="1f1b"), "interleaved_1f1b"),
    ("fam-1b", dict(zero=4), "zero_stage"),
    ("fam-1b", dict(precision="bf16-zero", dtype="fp32"), "bf16"),
    ("fam-1b", dict(scan_keys="cat"), "scan_keys"),
    ("fam-1b", dict(rope_tables="once"), "rope_tables"),
])
def test_impossible_combinations_raise_naming_the_setting(config, kwargs, words):
    with pytest.raises(ValueError, match=words):
        estimate(load_model_args(config), Settings(**kwargs))


@pytest.mark.gpu
@pytest.mark.parametrize("name, seq, recompute, vocab, microbatches, measured_gib, card", GPU_PEAKS)
def test_estimate_within_15pct_of_measured_peak_on_gpu(name, seq, recompute, vocab, microbatches, measured_gib, card):
    """Needs CUDA: FlexAttention, the compiled scan and bf16 autocast only run there. The training
    path (return_logits=False), fused AdamW, set_to_none, gradient accumulation when asked. Earlier
    tests' scan caches are given back first (tests/conftest.py); what is still held is subtracted."""
    args = load_model_args(name, vocab_size=vocab, recompute=recompute)
    est = estimate(args, Settings(seq_len=seq, microbatches=microbatches))
    if est.peak > torch.cuda.get_device_properties(0).total_memory - 2 * GIB:
        pytest.skip(f"estimated {est.peak / GIB:.1f} GiB does not fit this card")
    before = torch.cuda.memory_allocated() / GIB  # what earlier tests still hold: not this model's
    model = build_model(args, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, args.vocab_size, (1, seq + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        for _ in range(microbatches):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False)
            out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() / GIB - before
    print(f"\nGPU_PEAK {name} seq {seq} recompute {recompute} vocab {vocab} x{microbatches}: measured {measured:.2f} "
          f"GiB, estimated {est.peak / GIB:.2f} GiB ({est.peak_phase}), {before:.2f} GiB held before, on "
          f"{torch.cuda.get_device_name()}")
    del model, opt, out
    assert abs(est.peak / GIB - measured) / measured < 0.15
