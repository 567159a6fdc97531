"""Per-GPU memory estimate of a famtron training step: weights, gradients, optimizer, activations.

    python -m pipeline.memory --config configs/recipes/fam-8b-8x80gb.yaml --dp 4
    python -m pipeline.memory --config fam-1b --tp 1 --pp 1 --dp 1 --zero 0 --micro-batch 1 \
        --seq-len 65536 --recompute --vocab-size 32000 --fresh-start

Every term is counted from what *this* implementation allocates (model/layer.py, model/scan.py,
model/attention.py, model/language_model.py), per GPU, for one pipeline rank:

- weights, gradients, optimizer (bytes per parameter of the rank's shard, Ψ = its parameters):
  precision "autocast" (the project's loop on GPU: fp32 params, bf16 autocast): weights 4Ψ,
  gradients 4Ψ, Adam m and v 8Ψ (the fp32 params are the master copy). Precision "bf16-zero"
  (DeepSpeed bf16): weights 2Ψ, gradients 2Ψ, optimizer 12Ψ (fp32 master, m, v); at the step
  DeepSpeed adds an fp32 gradient partition 4Ψ/DP. ZeRO-1 divides the optimizer by DP, ZeRO-2
  also the gradients, ZeRO-3 also the weights. `offload_optimizer` moves the optimizer (and the
  fp32 gradient partition) to host memory: `optimizer_host`. ZeRO ≥ 1 adds DeepSpeed's
  communication buckets (its defaults: a 5e8-element reduce bucket, 1e9 live ZeRO-3 params).
  Gradients are resident in the forward only when they accumulate (several micro-batches per
  step, or a pipeline) or DeepSpeed keeps them; a single micro-batch with
  `zero_grad(set_to_none=True)` has none then.
- activations: what autograd saves, per layer per micro-batch (layer_activation_terms): the
  layer input [F+S, b, h]; both RMSNorms (rstd; their outputs, which megatron's linears save in
  the input dtype, fp32 under autocast; the CPU's composite norm also saves x·rstd); RoPE's cos/sin
  for q and k, fp32; block attention's q, the concatenated K and V [T·(F+C), b, g, d] (memory +
  FAM keys + blocks), the output and the fp32 log-sum-exp (the CPU's dense SDPA also saves the
  [T·C, T·(F+C)] float mask); the SwiGLU intermediates (fc1 out 2f, up + offset f, silu f,
  product f); the FAM scan's per-block [F_{t-1}; block t] K/V, its F rows' own norm/QKV/attention
  /FFN tensors, and (autocast on GPU) the bf16 copies of the layer's four matrices that the
  compiled step saves. With recompute only each layer's input is saved (plus positions), and
  backward re-creates one layer's full set. The dense baseline saves the QKV output (v is a view
  of it), q, k, the output and lse.
- fam_state: what the layers' LayerState keeps alive until the stage's forward returns: mem_k is
  a view of the whole post-RoPE k and mem_v a view of the whole QKV output, so each layer holds
  [S, b, (n+2g)·d] + [S, b, g·d] beyond what autograd saves. With recompute at long sequences this
  is what separates FAM/BSWA from dense (the layer inputs alone would be 4x smaller).
- head (last stage): logits [S, b, V/tp] in the compute dtype, their fp32 copy (`.float()`) and
  the fp32 clone that vocab_parallel_cross_entropy saves as the softmax: 10 B per logit under
  autocast at the forward peak. First stage: token ids (int64) for the embedding backward.
- mask_build: FlexAttention's `create_block_mask` evaluates the mask function on the full
  [T·C, T·(F+C)] grid through vmap: 22 B per element (two int64 grids and bool temporaries,
  measured), once, in the first forward. At 65k tokens that is ~93 GiB, more than the rest of a
  1B model's step; building the BlockMask from block indices would remove it.
- in flight: a pipeline rank holds the saved activations of its in-flight micro-batches: all of
  them under GPipe, P - rank under 1F1B, 2(P - rank - 1) + (v - 1)P + 1 chunk-forwards of L/(Pv)
  layers under interleaved 1F1B.
The peak is the largest of: the forward's end at the logits; the backward (all gradients, one
layer's full activations and their gradients); the optimizer step; the first step's mask build.
`fits` keeps an allowance (CUDA context, NCCL, allocator fragmentation) free on the GPU.

Calibration (tests/test_memory.py): on CPU the activation terms match autograd's saved tensors
of the real model within 1%; against torch.cuda.max_memory_allocated on one H200
(benchmarks/train_step.py's step, vocab 32000, micro-batch 1) every cell is within 0.5%:
fam-1b 8k 44.97 (est. 45.09), bswa-1b 8k x2 micro-batches 45.72 (45.63), dense-1b 32k 116.9
(116.8), fam-1b 16k recompute 24.63 (24.54), fam-1b 65k recompute 100.1 (100.2, the mask build).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from model.config import ModelArgs, model_args_from_dict, read_config_tree
from pipeline.pipeline_parallel import SCHEDULES, split_layers

GIB = 2**30
MASK_BUILD_BYTES_PER_ELEMENT = 22  # create_block_mask via vmap; measured on CPU (ru_maxrss) and H200
ZERO_REDUCE_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size
ZERO3_LIVE_PARAMETERS = 1e9  # DeepSpeed's default stage3_max_live_parameters
DEFAULT_ALLOWANCE_GIB = 4.0  # CUDA context + NCCL buffers + allocator fragmentation
PRECISIONS = ("autocast", "bf16-zero")
KERNELS = ("cuda", "cpu")


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of each kind of tensor, from (precision, dtype)."""

    param: int  # model weights
    grad: int
    optimizer: int  # per parameter, before ZeRO division
    act: int  # matmul/attention outputs (the compute dtype)
    resid: int  # residual stream, norm inputs/outputs (fp32 under autocast: bf16 + fp32 -> fp32)
    autocast: bool


def element_bytes(precision: str, dtype: str) -> Bytes:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype={dtype!r}: must be bf16 or fp32")
    if precision == "bf16-zero":
        if dtype != "bf16":
            raise ValueError("precision='bf16-zero' computes in bf16; dtype must be bf16")
        return Bytes(param=2, grad=2, optimizer=12, act=2, resid=2, autocast=False)
    act = 2 if dtype == "bf16" else 4
    return Bytes(param=4, grad=4, optimizer=8, act=act, resid=4, autocast=act == 2)


# ---------------------------------------------------------------- parameters per rank


def layer_params(m: ModelArgs, tp: int = 1) -> tuple[int, int]:
    """(parameters of one layer on a TP rank, of which in the four matrices the scan uses)."""
    h, d, n, g = m.hidden_size, m.head_dim, m.num_attention_heads, m.query_groups
    matrices = (h * (n + 2 * g) * d + n * d * h + 3 * h * m.ffn_size) // tp
    return matrices + 2 * h, matrices


def stage_params(m: ModelArgs, layers: int, first: bool, last: bool, tp: int = 1) -> int:
    """Parameters of a pipeline rank: its layers, the embedding and FAM prompt on the first
    stage, the final norm and output layer on the last (ModelArgs.num_params, split)."""
    h = m.hidden_size
    total = layers * layer_params(m, tp)[0]
    if first:
        total += m.vocab_size * h // tp + (m.fam_len * h if m.uses_fam else 0)
    if last:
        total += h + m.vocab_size * h // tp
    return total


# ---------------------------------------------------------------- activations


def layer_activation_terms(m: ModelArgs, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                           bytes_: Bytes | None = None, kernels: str = "cuda") -> dict[str, int]:
    """Bytes autograd saves for one layer and one micro-batch, by part (no recompute)."""
    e = bytes_ or element_bytes("autocast", "bf16")
    S, b, h, d, f = seq_len, micro_batch, m.hidden_size, m.head_dim, m.ffn_size
    n, g = m.num_attention_heads // tp, m.query_groups // tp
    F = m.fam_len if m.uses_fam else 0
    shard = tp if sequence_parallel else 1
    normed = h * e.resid if kernels == "cpu" else 0  # composite RMSNorm also saves x * rstd
    rows = S * b
    terms = {
        "input": (F + S) * b * h * e.resid // shard,
        "norms": rows * (2 * 4 + 2 * normed + 3 * h * e.resid) // shard,  # rstd x2, outputs x2, residual
        "rope": 4 * rows * d * 4,  # cos, sin of q and k positions, fp32
        "mlp": 5 * rows * (f // tp) * e.act,
    }
    if m.attention == "dense":
        terms["attention"] = rows * ((n + 2 * g) + n + g + n) * d * e.act + b * n * S * 4
        return terms
    C = m.block_size
    T = math.ceil(S / C)
    q_len, kv_len = T * C, T * (F + C)
    terms["attention"] = b * (2 * q_len * n + 2 * kv_len * g) * d * e.act + b * n * q_len * 4
    if kernels == "cpu":
        terms["attention"] += q_len * kv_len * e.act  # SDPA's float copy of the dense mask
    if F:
        lin = e.act if e.autocast else e.resid  # F.linear under autocast saves its bf16 input
        row = 2 * h * e.resid + 8 + 2 * normed + 2 * h * lin + 2 * n * d * e.act + 4 * n + 4 * (f // tp) * e.act
        terms["fam_scan"] = T * F * b * (row + 4 * d * 4) + 2 * T * b * (F + C) * g * d * e.act
        if e.autocast and kernels == "cuda":  # the compiled step saves the layer's bf16 matrices
            terms["fam_scan"] += 2 * layer_params(m, tp)[1]
    return terms


def layer_held_bytes(m: ModelArgs, seq_len: int, micro_batch: int, tp: int = 1, bytes_: Bytes | None = None) -> int:
    """Bytes a layer's LayerState keeps alive until the stage forward returns (not saved by
    autograd): mem_k views the whole post-RoPE k, mem_v the whole QKV output; plus the FAM."""
    e = bytes_ or element_bytes("autocast", "bf16")
    if m.attention == "dense":
        return 0
    S, b, d = seq_len, micro_batch, m.head_dim
    n, g = m.num_attention_heads // tp, m.query_groups // tp
    held = m.fam_len * b * m.hidden_size * e.resid if m.uses_fam else 0
    if m.mem_blocks:
        held += S * b * (n + 3 * g) * d * e.act
    return held


def head_bytes(m: ModelArgs, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
               bytes_: Bytes | None = None, kernels: str = "cuda") -> tuple[int, int]:
    """(saved, transient) bytes of the last stage's final norm, logits and loss, one micro-batch.
    Saved: norm rstd/output, the fp32 softmax of vocab_parallel_cross_entropy, target mask and
    index. Transient at the forward peak: the logits and their `.float()` copy."""
    e = bytes_ or element_bytes("autocast", "bf16")
    rows, h = seq_len * micro_batch, m.hidden_size
    shard = tp if sequence_parallel else 1
    logits = rows * (m.vocab_size // tp)
    normed = h * e.resid if kernels == "cpu" else 0
    saved = rows * (4 + normed + h * e.resid) // shard + logits * 4 + rows * (1 + 8)
    transient = logits * e.act + (logits * 4 if e.act != 4 else 0)
    return saved, transient


def embedding_saved_bytes(seq_len: int, micro_batch: int) -> int:
    return seq_len * micro_batch * 8  # int64 token ids for the embedding's backward


def mask_build_bytes(m: ModelArgs, seq_len: int, kernels: str = "cuda") -> int:
    """create_block_mask's transient on the first forward (GPU FlexAttention only)."""
    if m.attention == "dense" or kernels != "cuda":
        return 0
    C, F = m.block_size, (m.fam_len if m.uses_fam else 0)
    T = math.ceil(seq_len / C)
    return MASK_BUILD_BYTES_PER_ELEMENT * (T * C) * (T * (F + C))


# ---------------------------------------------------------------- pipeline


def split_counts(num_layers: int, pp: int, virtual_stages: int, layout: list[int] | None) -> list[int]:
    """Layers per pipeline chunk; the rules and messages of pipeline_parallel.split_layers."""
    return [len(r) for r in split_layers(num_layers, pp * virtual_stages, layout)]


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
    activations: int  # saved by autograd in the layers (and embedding), all in-flight micro-batches
    fam_state: int  # held by LayerState views during the forward (one micro-batch)
    head: int  # last stage: final norm, fp32 softmax (saved), logits and their fp32 copy (transient)
    backward_extra: int  # one layer recomputed + its gradients, at the backward peak
    mask_build: int  # first forward only
    peaks: dict[str, int] = field(default_factory=dict)

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
    settings: dict

    def worst(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    weights = property(lambda self: self.worst().weights)
    gradients = property(lambda self: self.worst().gradients)
    optimizer = property(lambda self: self.worst().optimizer)
    optimizer_host = property(lambda self: self.worst().optimizer_host)
    activations = property(lambda self: self.worst().activations)
    fam_state = property(lambda self: self.worst().fam_state)
    head = property(lambda self: self.worst().head)
    mask_build = property(lambda self: self.worst().mask_build)
    peak = property(lambda self: self.worst().peak)
    peak_phase = property(lambda self: self.worst().peak_phase)

    def fits(self, gpu_memory_gib: float = 80.0, allowance_gib: float = DEFAULT_ALLOWANCE_GIB) -> bool:
        return self.worst().peak + allowance_gib * GIB <= gpu_memory_gib * GIB


def validate_parallel(m: ModelArgs, tp: int, pp: int, dp: int, zero: int, sequence_parallel: bool,
                      offload_optimizer: bool, virtual_stages: int, schedule: str, seq_len: int, micro_batch: int,
                      layout: list[int] | None = None) -> None:
    """Raise ValueError naming the setting of the first impossible combination."""
    for name, value in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp), ("data_parallel_size", dp),
                        ("virtual_stages", virtual_stages), ("micro_batch_size", micro_batch), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")
    m.validate(tp, sequence_parallel)
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage={zero}: must be 0, 1, 2 or 3")
    if zero >= 2 and pp > 1:
        raise ValueError(f"parallel.zero_stage={zero} with parallel.pipeline_parallel_size={pp}: DeepSpeed shards "
                         "gradients (ZeRO-2/3) only without pipeline parallelism; use zero_stage 1 with PP")
    if offload_optimizer and zero == 0:
        raise ValueError("parallel.offload_optimizer=true needs parallel.zero_stage >= 1 (DeepSpeed ZeRO-Offload)")
    if sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel=true needs parallel.tensor_parallel_size > 1")
    if sequence_parallel and seq_len % tp:
        raise ValueError(f"seq_len={seq_len} must be divisible by tensor_parallel_size={tp} with sequence parallelism")
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pipeline_schedule={schedule!r}: must be one of {SCHEDULES}")
    if virtual_stages > 1 and schedule != "interleaved_1f1b":
        raise ValueError(f"parallel.virtual_stages={virtual_stages} needs "
                         "parallel.pipeline_schedule='interleaved_1f1b'")
    split_counts(m.num_layers, pp, virtual_stages, layout)


@dataclass(frozen=True)
class _Shapes:
    """Per-micro-batch byte counts shared by every rank of one estimate."""

    full_layer: int  # saved by one layer without recompute
    layer_input: int  # [F+S, b, h]: what recompute keeps per layer
    held_layer: int
    head_saved: int
    head_transient: int  # logits and their fp32 copy at the forward's loss
    head_backward: int  # the logits' gradient in the compute dtype
    first_layer_temps: int  # live while layer 0 builds the block mask
    workspace: int  # activation gradients of one layer's backward
    positions: int
    embedding: int
    mask: int


def _shapes(m: ModelArgs, S: int, b: int, tp: int, sp: bool, e: Bytes, kernels: str) -> _Shapes:
    shard = tp if sp else 1
    F = m.fam_len if m.uses_fam else 0
    terms = layer_activation_terms(m, S, b, tp, sp, e, kernels)
    layer_input = (F + S) * b * m.hidden_size * e.resid // shard
    held = layer_held_bytes(m, S, b, tp, e)
    saved, transient = head_bytes(m, S, b, tp, sp, e, kernels)
    logits = S * b * (m.vocab_size // tp)
    return _Shapes(
        full_layer=sum(terms.values()), layer_input=layer_input, held_layer=held, head_saved=saved,
        head_transient=transient, head_backward=logits * e.act if e.act != 4 else 0,
        first_layer_temps=layer_input + held + terms["attention"],
        workspace=4 * S * b * (m.ffn_size // tp) * e.act + 2 * layer_input,
        positions=S * b * 4, embedding=embedding_saved_bytes(S, b), mask=mask_build_bytes(m, S, kernels),
    )


def _rank_memory(m: ModelArgs, rank: int, layers: int, first: bool, last: bool, sh: _Shapes, e: Bytes,
                 opts: dict) -> RankMemory:
    """One pipeline rank's terms and its peak in each phase of a step."""
    tp, pp, dp, zero, v = opts["tp"], opts["pp"], opts["dp"], opts["zero"], opts["virtual_stages"]
    params = stage_params(m, layers, first, last, tp)
    weights = params * e.param // (dp if zero >= 3 else 1)
    gradients = params * e.grad // (dp if zero >= 2 else 1)
    optimizer = params * e.optimizer // (dp if zero >= 1 else 1)
    # DeepSpeed's fp32 gradient partition, alive at the step
    step_grad = params * 4 // dp if opts["precision"] == "bf16-zero" and zero else 0
    offload = opts["offload_optimizer"]
    host, optimizer, step_grad = (optimizer + step_grad, 0, 0) if offload else (0, optimizer, step_grad)
    buffers = int(min(ZERO_REDUCE_BUCKET_ELEMENTS, params) * e.grad) if zero else 0
    buffers += int(min(ZERO3_LIVE_PARAMETERS, params) * e.param) if zero == 3 else 0
    flight = in_flight(opts["schedule"], pp, rank, v, opts["microbatches"])
    if opts["recompute"]:
        per_mb = (layers + 1) * sh.layer_input + sh.positions  # checkpointed inputs, stage output
        current_end = sh.layer_input + sh.positions + sh.full_layer  # layer 0, recomputed
    else:
        per_mb = layers * sh.full_layer + sh.layer_input
        current_end = sh.full_layer
    per_mb += sh.embedding if first else 0
    activations = int(flight * per_mb)
    losses = opts["microbatches"] if opts["schedule"] == "gpipe" and pp > 1 else 1  # 1F1B: backward follows the loss
    softmax = losses * sh.head_saved if last else 0
    others = softmax - sh.head_saved if last else 0  # after this micro-batch's loss backward
    fam_state = layers // v * sh.held_layer
    accumulate = opts["microbatches"] > 1 or pp > 1 or opts["precision"] == "bf16-zero"
    static = weights + optimizer + buffers
    grads_early = gradients if accumulate else 0
    recomputed = sh.full_layer if opts["recompute"] else 0
    peaks = {"forward": static + grads_early + activations + softmax + fam_state + (sh.head_transient if last else 0)}
    if last:  # the logits' gradient, before the output layer's backward frees the softmax
        peaks["loss backward"] = static + grads_early + activations + softmax + sh.head_backward
    peaks["backward"] = static + grads_early + activations + others + recomputed + sh.workspace
    peaks["backward end"] = static + gradients + activations - int(per_mb) + current_end + others + sh.workspace
    peaks["step"] = static + gradients + step_grad
    if sh.mask:
        early = weights + buffers + (0 if opts["fresh_start"] else optimizer)
        peaks["mask build"] = early + (sh.embedding if first else 0) + sh.first_layer_temps + sh.mask
    return RankMemory(rank, layers, params, flight, weights, gradients, optimizer, host, buffers, activations,
                      fam_state, softmax + sh.head_transient if last else 0, recomputed + sh.workspace,
                      sh.mask, peaks)


def estimate(model_args: ModelArgs, tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0, micro_batch: int = 1,
             seq_len: int = 8192, recompute: bool | None = None, sequence_parallel: bool = False,
             offload_optimizer: bool = False, dtype: str = "bf16", virtual_stages: int = 1, *,
             precision: str = "autocast", schedule: str | None = None, microbatches: int | None = None,
             layout: list[int] | None = None, kernels: str = "cuda", fresh_start: bool = False) -> MemoryEstimate:
    """Per-GPU bytes of every pipeline rank (see the module docstring for each term).
    `microbatches`: per DP rank per step (default: P, the fewest that fill the pipeline);
    `kernels`: "cuda" (FlexAttention, fused RMSNorm, compiled scan) or "cpu" (dense-mask SDPA);
    `fresh_start`: the first step runs before the optimizer states exist (not a resumed run)."""
    m = model_args
    opts = dict(tp=tp, pp=pp, dp=dp, zero=zero, micro_batch=micro_batch, seq_len=seq_len,
                recompute=m.recompute if recompute is None else recompute, sequence_parallel=sequence_parallel,
                offload_optimizer=offload_optimizer, dtype=dtype, precision=precision, virtual_stages=virtual_stages,
                schedule=schedule or ("interleaved_1f1b" if virtual_stages > 1 else "1f1b"),
                microbatches=microbatches or pp, layout=layout, kernels=kernels, fresh_start=fresh_start)
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: must be one of {KERNELS}")
    validate_parallel(m, tp, pp, dp, zero, sequence_parallel, offload_optimizer, virtual_stages, opts["schedule"],
                      seq_len, micro_batch, layout)
    e = element_bytes(precision, dtype)
    sh = _shapes(m, seq_len, micro_batch, tp, sequence_parallel, e, kernels)
    counts = split_counts(m.num_layers, pp, virtual_stages, layout)
    ranks = []
    for rank in range(pp):
        own = [v * pp + rank for v in range(virtual_stages)]
        layers = sum(counts[i] for i in own)
        ranks.append(_rank_memory(m, rank, layers, 0 in own, len(counts) - 1 in own, sh, e, opts))
    return MemoryEstimate(ranks, opts)


# ---------------------------------------------------------------- command line

_ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer states", "optimizer"),
         ("ZeRO buffers", "zero_buffers"), ("activations (in flight)", "activations"),
         ("FAM state + K/V views (fwd)", "fam_state"),
         ("logits + loss (last)", "head"), ("backward: recompute + grads", "backward_extra"),
         ("mask build (first step)", "mask_build"))


def format_table(est: MemoryEstimate, gpu_memory_gib: float = 80.0,
                 allowance_gib: float = DEFAULT_ALLOWANCE_GIB) -> str:
    """The per-rank table in GiB, the peak by phase, host memory and the verdict."""
    ranks = est.ranks
    if len(ranks) > 3:  # first, last and the worst of the rest
        middle = max(ranks[1:-1], key=lambda r: r.peak)
        ranks = [ranks[0], middle, ranks[-1]]
    s = est.settings
    head = (f"TP={s['tp']} PP={s['pp']} DP={s['dp']} ZeRO-{s['zero']} v={s['virtual_stages']} {s['schedule']} "
            f"micro-batch {s['micro_batch']} x {s['microbatches']} per step, seq {s['seq_len']}, "
            f"recompute={s['recompute']}, SP={s['sequence_parallel']}, offload={s['offload_optimizer']}, "
            f"{s['precision']} {s['dtype']}, {s['kernels']} kernels")
    width = 30
    lines = [head, f"{'GiB per GPU':<{width}}" + "".join(f"{f'rank {r.rank} ({r.layers} layers)':>22}" for r in ranks)]
    for label, name in _ROWS:
        lines.append(f"{label:<{width}}" + "".join(f"{getattr(r, name) / GIB:>22.2f}" for r in ranks))
    lines.append(f"{'in-flight micro-batches':<{width}}" + "".join(f"{r.in_flight:>22g}" for r in ranks))
    phases = list(dict.fromkeys(p for r in ranks for p in r.peaks))
    for phase in phases:
        cells = "".join(f"{r.peaks[phase] / GIB:>22.2f}" if phase in r.peaks else f"{'-':>22}" for r in ranks)
        lines.append(f"{'peak at ' + phase:<{width}}" + cells)
    lines.append(f"{'PEAK':<{width}}" + "".join(f"{r.peak / GIB:>22.2f}" for r in ranks))
    host = "".join(f"{r.optimizer_host / GIB:>22.2f}" for r in ranks)
    lines.append(f"{'host (offloaded optimizer)':<{width}}" + host)
    worst = est.worst()
    verdict = "fits" if est.fits(gpu_memory_gib, allowance_gib) else "DOES NOT FIT"
    lines.append(f"{verdict}: peak {worst.peak / GIB:.2f} GiB (rank {worst.rank}, {worst.peak_phase}) + "
                 f"{allowance_gib:g} GiB allowance (CUDA context, NCCL, fragmentation) vs {gpu_memory_gib:g} GiB")
    return "\n".join(lines)


def settings_from_config(tree: dict) -> dict:
    """estimate() keyword defaults from a config tree's parallel, data, model and train sections."""
    par, data = tree.get("parallel", {}) or {}, tree.get("data", {}) or {}
    zero = par.get("zero_stage", 0)
    out = dict(
        tp=par.get("tensor_parallel_size", 1), pp=par.get("pipeline_parallel_size", 1), zero=zero,
        virtual_stages=par.get("virtual_stages", 1), layout=par.get("pipeline_layout"),
        schedule=par.get("pipeline_schedule"), sequence_parallel=par.get("sequence_parallel", False),
        offload_optimizer=par.get("offload_optimizer", False), micro_batch=data.get("micro_batch_size", 1),
        seq_len=data.get("seq_len", 8192), precision="bf16-zero" if zero else "autocast",
    )
    out["global_batch"] = data.get("global_batch_size")
    return out


def estimate_config(name_or_path: str | Path, dp: int = 1, **overrides) -> MemoryEstimate:
    """estimate() for a config file (name or YAML path) and a data-parallel size; keyword
    arguments override the file's values (None keeps them)."""
    tree = read_config_tree(name_or_path)
    args = model_args_from_dict(dict(tree.get("model", {}) or {}), f"{name_or_path}: model")
    kw = settings_from_config(tree)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    global_batch = kw.pop("global_batch")
    vocab = kw.pop("vocab_size", None)
    if vocab:
        args.vocab_size = vocab
    if global_batch and not kw.get("microbatches"):
        per_step = kw["micro_batch"] * dp
        if global_batch % per_step:
            raise ValueError(f"data.global_batch_size={global_batch} is not a multiple of micro-batch "
                             f"{kw['micro_batch']} x data-parallel size {dp}")
        kw["microbatches"] = global_batch // per_step
    return estimate(args, dp=dp, **kw)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.memory", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config name (configs/<name>.yaml) or YAML path")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (world / (TP x PP))")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--global-batch", type=int, help="samples per step (default: data.global_batch_size)")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--virtual-stages", type=int)
    p.add_argument("--pipeline-schedule", choices=SCHEDULES)
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16-zero with ZeRO >= 1, else autocast")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="compute dtype")
    p.add_argument("--kernels", choices=KERNELS, default="cuda")
    p.add_argument("--vocab-size", type=int, help="override model.vocab_size (benchmarks use 32000)")
    p.add_argument("--fresh-start", action="store_true", help="first step before optimizer states exist")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--allowance-gib", type=float, default=DEFAULT_ALLOWANCE_GIB)
    return p


def main(argv: list[str] | None = None) -> int:
    o = _parser().parse_args(argv)
    overrides = dict(tp=o.tp, pp=o.pp, zero=o.zero, micro_batch=o.micro_batch, seq_len=o.seq_len,
                     recompute=o.recompute, sequence_parallel=o.sequence_parallel,
                     offload_optimizer=o.offload_optimizer, virtual_stages=o.virtual_stages,
                     schedule=o.pipeline_schedule, precision=o.precision, dtype=o.dtype, kernels=o.kernels,
                     vocab_size=o.vocab_size, global_batch=o.global_batch, fresh_start=o.fresh_start or None)
    try:
        est = estimate_config(o.config, dp=o.dp, **overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(est, o.gpu_memory_gib, o.allowance_gib))
    return 0 if est.fits(o.gpu_memory_gib, o.allowance_gib) else 1


if __name__ == "__main__":
    sys.exit(main())
