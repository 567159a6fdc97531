"""Per-GPU memory estimate of a famtron training step: weights, gradients, optimizer, activations.

    python -m pipeline.memory --config configs/recipes/fam-8b-8x80gb.yaml --dp 4   (pipeline/memory/cli.py)

Every term counts what *this* implementation allocates (model/layer.py, model/scan.py,
model/attention.py, model/language_model.py), per GPU, for one pipeline rank, on the training
path: `model(tokens, labels=..., return_logits=False)`, and the pipeline's last stage's `lm_loss`.

- weights, gradients, optimizer, per parameter Ψ of the rank's shard. "autocast" (fp32 params,
  bf16 autocast): 4Ψ, 4Ψ, Adam 8Ψ. "bf16-mixed" (train.precision's GPU default without ZeRO,
  pipeline/training/precision.py): bf16 weights 2Ψ, fp32 gradient buffers 4Ψ allocated once (live
  in every phase from the first step on), 12Ψ (fp32 master, m, v), plus the bf16 .grad tensors
  alive before their hooks free them (`_weight_grad_bytes`); activations as under autocast.
  "bf16-zero" (DeepSpeed bf16): 2Ψ, 2Ψ, 12Ψ (fp32 master, m, v),
  plus an fp32 gradient partition 4Ψ/DP at the step. ZeRO-1/2/3 divide the optimizer / also the
  gradients / also the weights by DP; `offload_optimizer` moves the optimizer and that partition
  to the host, and with ZeRO-3 also the gradient partition (DeepSpeed 0.19.8's stage 3 reduces
  it straight into a host buffer, `grad_partitions_flat_buffer`); torch rounds pinned host
  buffers up to a power of two (not counted). ZeRO ≥ 1 adds DeepSpeed's buckets (defaults:
  5e8-element reduce, 1e9 live ZeRO-3 params). Gradients exist in the forward only when they
  accumulate (micro-batches, a pipeline, micro-chunks), DeepSpeed keeps them, or bf16-mixed
  allocated them once (its fp32 buffers).
- activations, sequence parallelism, fam_state, the head and the block mask: per micro-batch, in
  pipeline/memory/terms.py. With micro-chunks (train.micro_chunk_len, docs/fam.md "Micro-chunks") they
  are one micro-chunk's, plus the passed state's K/V among its keys; exact mode adds its saved
  boundary states (K - 1 LayerStates per layer; in host memory with offload_states) and two
  states' gradients in the backward; truncated mode under PP has K x micro-batches in flight.
- in flight: all micro-batches under GPipe, P - rank under 1F1B, 2(P - rank - 1) + (v - 1)P + 1
  chunk-forwards of L/(Pv) layers under interleaved 1F1B.
The peak is the largest of the forward's end, the loss backward, the backward (all gradients, one
layer recomputed and its gradients), its end and the optimizer step. `fits` keeps an allowance
(CUDA context, NCCL, fragmentation) free.

Calibration (tests/test_memory.py): on CPU the activation terms equal autograd's saved tensors
of the real fp32 model (loss in one chunk or many; FAM, BSWA, dense; recompute) to 16 bytes, the
eager FAM scan's (prompt step included) exactly, and the GPU scan's terms equal what
model/fast_scan.py saves when run on CPU (fp32 and bf16) exactly. Against torch.cuda.max_memory_allocated
on one H200 (training path, vocab 32000 unless said) within -3.3%..+2.9% for 12 autocast peaks
(tests/test_memory.py GPU_PEAKS): fam-1b 8k 42.34 (est. 40.92), 8k vocab 256000 51.35 (51.18),
dense-1b 32k 108.7 (108.7), fam-1b 65k recompute 35.62 (36.67), the same at vocab 256000 44.59
(44.96). bf16-mixed (tests/test_memory_precision.py): weights, gradients and optimizer equal a real
MixedPrecisionOptimizer's bytes after a step, exactly; 10 peaks on the H200 within -4.7%..+2.6%
(MIXED_GPU_PEAKS): fam-1b 8k 48.2 (46.2), micro-chunk rows to 1M tokens in both modes (fam-1b
exact 1M 89.8, est. 87.4), dense-1b 128k and 256k with recompute 53.5 and 85.2 (54.6, 87.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from model.config import ModelArgs
from pipeline.config.rules import ParallelPlan, check_parallel, layer_counts
from pipeline.memory.terms import (Bytes, HeadBytes, block_mask_bytes, element_bytes, embedding_saved_bytes,
                                   head_bytes, layer_activation_terms, layer_held_bytes, layer_params, rope_table_bytes,
                                   scan_kept_bytes, stage_params)

GIB = 2**30
ZERO_REDUCE_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size
ZERO3_LIVE_PARAMETERS = 1e9  # DeepSpeed's default stage3_max_live_parameters
DEFAULT_ALLOWANCE_GIB = 4.0  # CUDA context + NCCL buffers + allocator fragmentation
KERNELS = ("cuda", "cpu")
SWIGLU = ("eager", "fused")  # Settings.swiglu
SCAN_KEYS = ("held", "joined", "block")  # Settings.scan_keys
ROPE_TABLES = ("shared", "per-layer")  # Settings.rope_tables


# ---------------------------------------------------------------- pipeline


def in_flight(schedule: str, pp: int, rank: int, virtual_stages: int, microbatches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once, as whole-rank multiples
    (interleaved: chunk-forwards in flight / virtual stages)."""
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(microbatches, pp - rank)
    chunks = min(microbatches * virtual_stages, 2 * (pp - rank - 1) + (virtual_stages - 1) * pp + 1)
    return chunks / virtual_stages


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Settings:
    """What is estimated: the parallel layout, the step's shape and the kernels.
    `microbatches`: per DP rank per step (default: P, the fewest that fill the pipeline);
    `precision`: "autocast" (fp32 weights, bf16 autocast), "bf16-mixed" (bf16 weights, fp32 masters and
    gradient buffers: MixedPrecisionOptimizer, no ZeRO) or "bf16-zero" (DeepSpeed's bf16);
    `kernels`: "cuda" (FlexAttention, fused RMSNorm, compiled scan) or "cpu" (dense-mask SDPA);
    `return_logits`: the loss from whole logits (`model(..., return_logits=True)`), not lm_loss;
    `swiglu`: "fused" (model/mlp.py's compiled SwiGLU, the GPU's default; with kernels="cpu" it counts
    as eager) or "eager" (megatron's ops: the CPU's, and the GPU's with FUSED off; every GPU peak
    measured before 2026-12);
    `scan_keys`: what the GPU's fast scan saves of the block K/V: "held" (the block attention's keys and
    values [R + S], which it returns, and its loop's keys/values buffers [T, F + C], which its backward
    reads, except where a recompute replays a kept scan; since 2026-12-02), "joined" (the first two
    alone; sessions 16 to 20) or "block" (k and v, whose view kept the QKV output, beside the FAM K/V,
    which the layer then concatenated: every GPU peak measured before session 16);
    `rope_tables`: "shared" (one forward's RoPE tables, saved once for all its layers: model/rope.py
    SharedTables, since 2026-12-02) or "per-layer" (each layer computed and saved its own, the tokens'
    queries' and keys' apart: every GPU peak measured before then).
    None (recompute, schedule, microbatches): the model's, the default for virtual_stages, P."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    micro_batch: int = 1
    seq_len: int = 8192
    recompute: bool | None = None
    sequence_parallel: bool = False
    offload_optimizer: bool = False
    dtype: str = "bf16"
    virtual_stages: int = 1
    precision: str = "autocast"
    schedule: str | None = None
    microbatches: int | None = None
    layout: list[int] | None = None
    kernels: str = "cuda"
    return_logits: bool = False
    swiglu: str = "fused"
    scan_keys: str = "held"
    rope_tables: str = "shared"
    micro_chunk_len: int = 0  # train.micro_chunk_len: 0 off
    micro_chunk_mode: str = "exact"  # train.micro_chunk_mode
    offload_states: bool = False  # train.micro_chunk_offload_states

    @property
    def micro_chunks(self) -> int:
        """Micro-chunks per sample (1 without)."""
        return -(-self.seq_len // self.micro_chunk_len) if self.micro_chunk_len else 1

    def resolved(self, model_args: ModelArgs) -> Settings:
        """The Nones filled in."""
        return replace(self, recompute=model_args.recompute if self.recompute is None else self.recompute,
                       schedule=self.schedule or ("interleaved_1f1b" if self.virtual_stages > 1 else "1f1b"),
                       microbatches=self.microbatches or self.pp)


@dataclass
class RankMemory:
    """Bytes on one GPU of pipeline rank `rank` (every field but `layers`/`params`/`in_flight`)."""

    rank: int
    layers: int
    params: int
    in_flight: float
    weights: int
    gradients: int
    optimizer: int
    optimizer_host: int
    zero_buffers: int
    block_mask: int  # FlexAttention's cached BlockMask, from the first forward on
    activations: int  # saved by autograd in the layers (and embedding), all in-flight micro-batches
    fam_state: int  # the layers' LayerState (last FAM, last m blocks' K/V), one micro-batch
    head: int  # last stage: final norm and loss, saved + the larger of its forward/backward transients
    backward_extra: int  # one layer recomputed + its gradients, at the backward peak
    peaks: dict[str, int] = field(default_factory=dict)
    boundary_states: int = 0  # exact micro-chunks: the saved states on the GPU (0 when offloaded)
    boundary_states_host: int = 0  # ... in host memory with offload_states

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    @property
    def peak_phase(self) -> str:
        return max(self.peaks, key=self.peaks.get)


@dataclass
class MemoryEstimate:
    """Every pipeline rank; the byte properties are the worst rank's (the one that must fit)."""

    ranks: list[RankMemory]
    settings: Settings

    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    weights = property(lambda self: self.worst().weights)
    gradients = property(lambda self: self.worst().gradients)
    optimizer = property(lambda self: self.worst().optimizer)
    optimizer_host = property(lambda self: self.worst().optimizer_host)
    activations = property(lambda self: self.worst().activations)
    fam_state = property(lambda self: self.worst().fam_state)
    head = property(lambda self: self.worst().head)
    peak = property(lambda self: self.worst().peak)
    peak_phase = property(lambda self: self.worst().peak_phase)

    def fits(self, gpu_memory_gib: float = 80.0, allowance_gib: float = DEFAULT_ALLOWANCE_GIB) -> bool:
        return self.worst().peak + allowance_gib * GIB <= gpu_memory_gib * GIB


@dataclass(frozen=True)
class _Shapes:
    """Per-micro-batch byte counts shared by every rank of one estimate."""

    full_layer: int  # saved by one layer without recompute
    layer_input: int  # [F+S, b, h]: what recompute keeps per layer
    scan_kept: int  # and, keeping the FAM scan (model.recompute_fam_scan false), the scan's rows per layer
    held_layer: int
    head: HeadBytes
    workspace: int  # activation gradients of one layer's backward
    positions: int
    rope: int  # one forward's RoPE tables, shared by its layers (terms.py rope_table_bytes)
    embedding: int
    block_mask: int


def _shapes(m: ModelArgs, s: Settings, e: Bytes) -> _Shapes:
    """With micro-chunks every term is one micro-chunk's (the longest: micro_chunk_len)."""
    S, b, tp, sp, kernels = min(s.seq_len, s.micro_chunk_len or s.seq_len), s.micro_batch, s.tp, s.sequence_parallel, \
        s.kernels
    shard = tp if sp else 1
    F = m.fam_len if m.uses_fam else 0
    # a recompute that replays a kept scan (model/scan_stash.py) holds no keys/values buffers for it
    keys = "joined" if s.scan_keys == "held" and s.recompute and not m.recompute_fam_scan else s.scan_keys
    terms = layer_activation_terms(m, S, b, tp, sp, e, kernels, s.swiglu, keys)
    rope = rope_table_bytes(m, S, b)
    if s.rope_tables == "per-layer":  # each layer's own: the tokens' queries' and keys' apart
        terms["rope"], rope = rope + 2 * S * b * m.head_dim * 4, 0
    if s.micro_chunks > 1 and m.attention != "dense":
        # a micro-chunk after the first attends to the passed state's m blocks too: their K/V join the saved keys
        # (and, on CPU, SDPA's mask copy widens by them); not exact: a micro-chunk after the first skips the
        # soft-prompt step that the terms count (measured on CPU: the estimate is 6.3 % over a FAM chunk's saved bytes, 0.1 % under BSWA's)
        memory = m.mem_blocks * m.block_size
        terms["state keys"] = 2 * b * memory * (m.query_groups // tp) * m.head_dim * e.act
        terms["state keys"] += S * memory * e.act if kernels == "cpu" else 0
    layer_input = (F + S) * b * m.hidden_size * e.resid // shard
    regather = S * b * m.hidden_size * e.resid if sp else 0  # an SP linear's input, gathered again
    # a layer's backward holds two FFN-wide gradients beyond its saved tensors at once: the gate's and the up
    # projection's, while the fc2 input's gradient they come from replaces that saved input, which fc2's backward
    # freed. Four (each FFN-wide tensor of the MLP's backward) overcounted every recompute peak measured on the
    # H200: +11 % at fam-1b 64k, +39 % at dense-1b 256k; two puts all 22 measured peaks within 5 %
    # (tests/test_memory.py GPU_PEAKS, tests/test_memory_precision.py MIXED_GPU_PEAKS).
    return _Shapes(
        full_layer=sum(terms.values()), layer_input=layer_input, scan_kept=scan_kept_bytes(m, S, b, tp, sp, e, kernels),
        held_layer=layer_held_bytes(m, S, b, tp, sp, e),
        head=head_bytes(m, S, b, tp, sp, e, kernels, s.return_logits),
        workspace=2 * S * b * (m.ffn_size // tp) * e.act + 2 * layer_input + regather,
        positions=S * b * 4, rope=rope, embedding=embedding_saved_bytes(S, b),
        block_mask=block_mask_bytes(m, S, kernels),
    )


def _rank_memory(m: ModelArgs, rank: int, layers: int, first: bool, last: bool, sh: _Shapes, e: Bytes,
                 s: Settings) -> RankMemory:
    """One pipeline rank's terms and its peak in each phase of a step."""
    tp, pp, dp, zero, v = s.tp, s.pp, s.dp, s.zero, s.virtual_stages
    params = stage_params(m, layers, first, last, tp)
    weights = params * e.param // (dp if zero >= 3 else 1)
    gradients = params * e.grad // (dp if zero >= 2 else 1)
    optimizer = params * e.optimizer // (dp if zero >= 1 else 1)
    # DeepSpeed's fp32 gradient partition, alive at the step
    step_grad = params * 4 // dp if s.precision == "bf16-zero" and zero else 0
    offload = s.offload_optimizer
    host, optimizer, step_grad = (optimizer + step_grad, 0, 0) if offload else (0, optimizer, step_grad)
    if offload and zero == 3:
        host, gradients = host + gradients, 0
    buffers = int(min(ZERO_REDUCE_BUCKET_ELEMENTS, params) * e.grad) if zero else 0
    buffers += int(min(ZERO3_LIVE_PARAMETERS, params) * e.param) if zero == 3 else 0
    flight = in_flight(s.schedule, pp, rank, v, s.microbatches * (s.micro_chunks if pp > 1 else 1))
    if s.recompute:  # checkpointed inputs (and kept scans), stage output
        per_mb = (layers + 1) * sh.layer_input + layers * sh.scan_kept + sh.positions
        current_end = sh.layer_input + sh.positions + sh.full_layer + sh.rope  # layer 0, recomputed
    else:  # the forward's RoPE tables, saved by every layer
        per_mb = layers * sh.full_layer + sh.layer_input + sh.rope
        current_end = sh.full_layer + sh.rope
    per_mb += sh.embedding if first else 0
    activations = int(flight * per_mb)
    losses = s.microbatches if s.schedule == "gpipe" and pp > 1 else 1  # 1F1B: backward follows the loss
    head_saved = losses * sh.head.saved if last else 0
    others = head_saved - sh.head.saved if last else 0  # after this micro-batch's loss backward
    fam_state = layers // v * sh.held_layer
    accumulate = s.microbatches > 1 or pp > 1 or s.precision == "bf16-zero" or s.micro_chunks > 1
    grads_live = accumulate or e.grads_always_live  # bf16-mixed's fp32 buffers are allocated once, at build
    layer_grads, end_grads = _weight_grad_bytes(m, e, tp, first)
    saved, state_grads = _boundary_bytes(s, layers // v * sh.held_layer)
    device_saved = 0 if s.offload_states else saved
    static = weights + optimizer + buffers + sh.block_mask
    live = static + (gradients if grads_live else 0) + activations + fam_state + device_saved
    # a kept scan is in `activations` already; a recomputed layer computes its own RoPE tables
    recomputed = sh.full_layer - sh.scan_kept + sh.rope if s.recompute else 0
    peaks = {"forward": live + head_saved + (sh.head.forward if last else 0)}
    if last:  # one loss chunk recomputed and its gradient, the output layer's weight gradient
        peaks["loss backward"] = live + head_saved + sh.head.backward
    peaks["backward"] = live + others + recomputed + sh.workspace + state_grads + layer_grads
    end = static + gradients + activations - int(per_mb) + current_end + fam_state + others + sh.workspace + end_grads
    peaks["backward end"] = end
    peaks["step"] = static + gradients + step_grad
    head = sh.head.saved + max(sh.head.forward, sh.head.backward) if last else 0
    return RankMemory(rank, layers, params, flight, weights, gradients, optimizer, host, buffers, sh.block_mask,
                      activations, fam_state, head, recomputed + sh.workspace + state_grads + layer_grads, peaks,
                      device_saved,
                      saved - device_saved)


def _weight_grad_bytes(m: ModelArgs, e: Bytes, tp: int, first: bool) -> tuple[int, int]:
    """bf16-mixed's bf16 .grad tensors alive at once (in a layer's backward, at the backward's end);
    0 for the other precisions, whose gradients are the `gradients` term itself. A weight used once
    has its bf16 gradient from its GEMM's backward until the post-accumulate-grad hook, right after,
    adds it to the fp32 buffer and frees it: one layer's weights at most. A FAM layer's four
    matrices are used twice (the whole-sequence GEMM and the FAM scan): autograd keeps the partial
    sums of those whose GEMM backward ran until the scan's backward adds its own for all four, so
    up to twice the matrices. At the end, the first stage's embedding gradient. The output layer's
    is in the head's loss backward (terms.py head_bytes)."""
    if not e.weight_grad:
        return 0, 0
    params, matrices = layer_params(m, tp)
    layer = (params + (matrices if m.uses_fam else 0)) * e.weight_grad
    embedding = m.vocab_size * m.hidden_size // tp * e.weight_grad if first else 0
    return layer, max(layer, embedding)


def _boundary_bytes(s: Settings, state: int) -> tuple[int, int]:
    """(saved boundary states, state gradients in the backward) of exact micro-chunks, for a rank
    whose layers' LayerState is `state` bytes (model/micro_chunks.py): the K - 1 states after
    every micro-chunk but the last, and two states' gradients (handed in, and the leaves' .grad).
    Truncated mode saves none: one detached state, counted as fam_state."""
    if s.micro_chunks == 1 or s.micro_chunk_mode != "exact":
        return 0, 0
    return (s.micro_chunks - 1) * state, 2 * state


def estimate(model_args: ModelArgs, settings: Settings = Settings()) -> MemoryEstimate:
    """Per-GPU bytes of every pipeline rank (see the module docstring for each term)."""
    m, s = model_args, settings.resolved(model_args)
    if s.kernels not in KERNELS:
        raise ValueError(f"kernels={s.kernels!r}: must be one of {KERNELS}")
    if s.swiglu not in SWIGLU:
        raise ValueError(f"swiglu={s.swiglu!r}: must be one of {SWIGLU} ('fused': model/mlp.py on CUDA)")
    if s.rope_tables not in ROPE_TABLES:
        raise ValueError(f"rope_tables={s.rope_tables!r}: must be one of {ROPE_TABLES} ('shared': model/rope.py now)")
    if s.scan_keys not in SCAN_KEYS:
        raise ValueError(f"scan_keys={s.scan_keys!r}: must be one of {SCAN_KEYS} ('joined': model/fast_scan.py now)")
    if s.return_logits and s.pp > 1:
        raise ValueError("return_logits=true: the pipeline's last stage always computes the loss with lm_loss")
    plan = ParallelPlan(s.tp, s.pp, s.dp, None, s.zero, s.offload_optimizer, s.sequence_parallel, s.virtual_stages,
                        s.schedule, s.layout, s.seq_len, s.micro_batch, s.microbatches * s.micro_batch * s.dp,
                        micro_chunks=s.micro_chunks)
    check_parallel(m, plan)  # the training config's rules (pipeline/config/rules.py)
    if s.precision == "bf16-mixed" and s.zero:
        raise ValueError(f"precision='bf16-mixed' with zero={s.zero}: under ZeRO DeepSpeed's bf16 optimizer runs "
                         "(pipeline/training/precision.py); estimate it with precision='bf16-zero'")
    e = element_bytes(s.precision, s.dtype)
    sh = _shapes(m, s, e)
    counts = layer_counts(m.num_layers, s.pp * s.virtual_stages, s.layout)
    ranks = []
    for rank in range(s.pp):
        own = [v * s.pp + rank for v in range(s.virtual_stages)]
        layers = sum(counts[i] for i in own)
        ranks.append(_rank_memory(m, rank, layers, 0 in own, len(counts) - 1 in own, sh, e, s))
    return MemoryEstimate(ranks, s)
