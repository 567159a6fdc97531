"""Byte terms of pipeline/memory/estimate.py's estimate, per micro-batch: parameters per rank, what autograd
saves per layer, the layers' held state, the last stage's loss head and the block mask.

Every term counts what *this* implementation allocates, per GPU, on the training path (see
pipeline/memory/estimate.py).

- activations: what autograd saves per layer per micro-batch (layer_activation_terms): the layer
  input [F+S, b, h]; both RMSNorms (rstd, outputs saved by megatron's linears in the input dtype,
  fp32 under autocast; the CPU's composite norm also x·rstd); block
  attention's q [S], K and V [R + S, b, g, d] (R: the FAM keys padded to a tile, model/masks.py),
  output and fp32 lse (CPU: SDPA's float mask; GPU with model.overlap_fam_scan at TP = 1: two
  outputs and lses, the window and FAM parts', and the window part's k and v, which keeps the QKV
  output); SwiGLU's intermediates (5 FFN-wide tensors in megatron's eager ops, 3 in model/mlp.py's
  fused kernel on CUDA); the FAM scan, T block steps
  plus the soft-prompt stream's step (F rows, no block keys): on CPU
  (kernels="cpu") what autograd keeps of model/scan.py's eager steps, on GPU what
  model/fast_scan.py's one node saves (its outputs, the block attention's K and V [R + S], which the
  attention then saves without new bytes; the prompt step's K/V and each step's Activations). The
  GPU scan's static buffers (model/scan_graphs.py: one set per shape for all layers, incl. the
  bf16 weight copies where the graphs do not read the weights in place) are not counted. With
  recompute only each layer's input (and positions) is saved, and backward re-creates one layer's
  full set.
- rope_tables: the RoPE cos/sin, fp32, of the tokens (queries and keys share them) and of the FAM
  rows, computed once per forward and shared by its layers (model/rope.py SharedTables): once
  per micro-batch, not per layer. A layer recomputed in backward computes its own.
- sequence parallelism shards by TP along the tokens what lies between the TP regions: layer
  input, norms, residuals (SP linears save their un-gathered input), and the FAM rows' (F/tp).
  QKV/attention/FFN tensors stay whole in S. A linear's backward re-gathers its input.
- fam_state: each layer's LayerState, the last FAM [F(/tp), b, h] and `.clone()`d K/V of the last
  m blocks [m·C, b, g, d]. Not saved by autograd but alive with the ModelOutput (through the
  backward in the training loop), so counted in every activation phase.
- head (last stage, lm_loss): the final norm's rstd and output (SP: also its gathered [S, b, h],
  the checkpointed chunks' input). The output layer and cross-entropy run over chunks of
  LOSS_CHUNK_ELEMENTS logits under checkpoint: one chunk's logits and fp32 copy exist at a time,
  in the forward and again in the backward beside the output layer's weight gradient (autocast:
  also the weight's cached bf16 copy). A one-chunk sequence is not checkpointed: its fp32
  softmax is saved. `return_logits=True` (API users) keeps all logits and their fp32 softmax.
- block_mask: the cached BlockMask over [S] x [R + S], built block by block
  (`create_block_mask(_compile=True)`): int32 indices per 128×128 block pair, megabytes. First stage: int64 token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from model import language_model
from model.config import ModelArgs
from model.masks import fam_key_rows

FLEX_BLOCK = 128  # FlexAttention's default BlockMask block size
BLOCK_MASK_BYTES_PER_BLOCK = 32  # 4 int32 index grids kept (kv/q, partial/full) + as much while built
PRECISIONS = ("autocast", "bf16-mixed", "bf16-zero")


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of each kind of tensor, from (precision, dtype)."""

    param: int  # model weights
    grad: int  # the gradients kept to the step (bf16-mixed: the fp32 buffers, allocated once)
    optimizer: int  # per parameter, before ZeRO division (bf16-mixed and bf16-zero: fp32 master + AdamW m, v)
    act: int  # matmul/attention outputs (the compute dtype)
    resid: int  # residual stream, norm inputs/outputs (fp32 under autocast: bf16 + fp32 -> fp32)
    autocast: bool
    casts_weights: bool = False  # autocast casts fp32 weights to bf16 at each use (not under bf16-mixed)
    weight_grad: int = 0  # a weight's bf16 .grad before the hook adds it to its fp32 buffer (bf16-mixed)
    grads_always_live: bool = False  # the gradients exist from the first step on, not only when accumulating


def element_bytes(precision: str, dtype: str) -> Bytes:
    """bf16-mixed (pipeline/training/precision.py): bf16 weights 2, fp32 gradient buffers 4, fp32
    master + AdamW 12; activations as under autocast (the model's per-op policy runs there too), except
    the residual stream, which is bf16 with bf16 weights (`resid` 2): the layer inputs that recompute
    keeps are half autocast's. Measured on the H200, dense-1b 128k with recompute: 53.5 GiB under
    bf16-mixed against 54.7 under autocast, whose weights alone are 2.4 GiB larger
    (tests/test_memory_precision.py MIXED_GPU_PEAKS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype={dtype!r}: must be bf16 or fp32")
    if precision in ("bf16-zero", "bf16-mixed") and dtype != "bf16":
        raise ValueError(f"precision={precision!r} computes in bf16; dtype must be bf16")
    if precision == "bf16-zero":
        return Bytes(param=2, grad=2, optimizer=12, act=2, resid=2, autocast=False)
    if precision == "bf16-mixed":
        return Bytes(param=2, grad=4, optimizer=12, act=2, resid=2, autocast=True, weight_grad=2,
                     grads_always_live=True)
    act = 2 if dtype == "bf16" else 4
    return Bytes(param=4, grad=4, optimizer=8, act=act, resid=4, autocast=act == 2, casts_weights=act == 2)


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


# shape: the layer's shape, then each estimate setting that changes what a layer saves (estimate.py Settings)
def layer_activation_terms(m: ModelArgs, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                           bytes_: Bytes | None = None, kernels: str = "cuda", swiglu: str = "fused",
                           scan_keys: str = "held") -> dict[str, int]:
    """Bytes autograd saves for one layer and one micro-batch, by part (no recompute). scan_keys: what
    the GPU's fast scan saves of the block K/V (pipeline/memory/estimate.py Settings)."""
    # SwiGLU: megatron's eager ops keep fc1's output (2 FFN widths), silu(gate), up + 0.0 and fc2's input;
    # model/mlp.py's compiled kernel on CUDA keeps fc1's output and fc2's input (silu recomputed in backward)
    mlp_widths = 3 if swiglu == "fused" and kernels == "cuda" else 5
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
        "mlp": mlp_widths * rows * (f // tp) * e.act,
    }
    if m.attention == "dense":
        terms["attention"] = rows * ((n + 2 * g) + n + g + n) * d * e.act + b * n * S * 4
        return terms
    C = m.block_size
    T = math.ceil(S / C)
    kv_len = fam_key_rows(T, F) + S  # keys [R + S]: FAM keys padded to a tile, then the tokens (model/masks.py)
    terms["attention"] = b * (2 * S * n + 2 * kv_len * g) * d * e.act + b * n * S * 4
    joined = bool(F) and kernels == "cuda" and scan_keys in ("joined", "held")
    if joined:  # the keys and values [R + S] are the fast scan's outputs, counted with it
        terms["attention"] = b * 2 * S * n * d * e.act + b * n * S * 4
    if F and kernels == "cuda" and m.overlap_fam_scan and tp == 1:
        # split (model/split_attention.py): the FAM part reads the scan's keys/values; the window part
        # saves k and v, a view that keeps the whole QKV output; a second output [S, b, n, d] and lse
        window_kv = _block_kv_bytes(S, b, n, g, d, e) if joined else 0  # (before: counted with the scan)
        terms["attention"] = b * 3 * S * n * d * e.act + 2 * b * n * S * 4 + window_kv
    if kernels == "cpu":
        terms["attention"] += S * kv_len * e.act  # SDPA's float copy of the dense mask
    if F:
        if kernels == "cpu":
            scan = _eager_scan_bytes(m, S, b, tp, shard, e, normed)
        else:
            scan = _fast_scan_bytes(m, S, b, tp, shard, e, joined, held=joined and scan_keys == "held")
        terms["fam_scan"] = scan
    return terms


def rope_table_bytes(m: ModelArgs, seq_len: int, micro_batch: int) -> int:
    """The RoPE tables of one forward (model/rope.py SharedTables), fp32: the tokens' cos and sin
    [S, b, 1, d] and, with FAM, the FAM rows' four [T, F, b, 1, d]."""
    return 2 * seq_len * micro_batch * m.head_dim * 4 + fam_rope_table_bytes(m, seq_len, micro_batch)


def fam_rope_table_bytes(m: ModelArgs, seq_len: int, micro_batch: int) -> int:
    """The FAM rows' RoPE tables of one forward: cos and sin of queries and keys [T, F, b, 1, d], fp32."""
    if not m.uses_fam:
        return 0
    return 4 * math.ceil(seq_len / m.block_size) * m.fam_len * micro_batch * m.head_dim * 4


def _eager_scan_bytes(m: ModelArgs, S: int, b: int, tp: int, shard: int, e: Bytes, normed: int) -> int:
    """model/scan.py `eager_scan` (CPU): T block steps and the soft-prompt stream's step (one over no
    block keys, commit 523c99c), each saving what autograd keeps of `fam_step`'s ops."""
    h, d, f, F = m.hidden_size, m.head_dim, m.ffn_size // tp, m.fam_len
    n, g = m.num_attention_heads // tp, m.query_groups // tp
    T = math.ceil(S / m.block_size)
    lin = e.act if e.autocast else e.resid  # F.linear under autocast saves its bf16 input
    local = h * e.resid + 8 + 2 * normed  # a, both rstd (and x * rstd): this rank's F/tp rows under SP
    whole = 2 * h * lin + 2 * n * d * e.act + 4 * n + 4 * f * e.act  # QKV/FC1 inputs, q, context, lse, SwiGLU
    steps = T + 1
    # a step's input FAM is the previous step's output; the first and the prompt step read the layer input's rows
    inputs = (T - 1) * (F // shard) * b * h * e.resid
    keys = 2 * b * ((T + 1) * F + S) * g * d * e.act  # [F_{t-1}; block t] per step, the prompt's F alone
    return steps * b * (F // shard * local + F * whole) + inputs + keys


def _fast_scan_bytes(m: ModelArgs, S: int, b: int, tp: int, shard: int, e: Bytes, joined: bool = True,
                     held: bool = False) -> int:
    """model/fast_scan.py `FAMScan` (GPU): no autograd inside; it saves its inputs and each step's
    `Activations` (model/scan_step.py), for the T blocks and the prompt step, and (held) its loop's
    keys/values buffers [T, F + C, b, g, d] (`_take_blocks`). Its weights are the parameters, read in
    place where they are in the GEMM dtype (else GEMM-dtype copies, per call or in the static buffers
    of model/scan_graphs.py, one set per shape for all layers: not counted here)."""
    d, n, g, T = m.head_dim, m.num_attention_heads // tp, m.query_groups // tp, math.ceil(S / m.block_size)
    if not joined:  # before session 16: its inputs k and v, and its FAM K/V [R] (the layer concatenated them)
        return _scan_rows_bytes(m, S, b, tp, shard, e) + _block_kv_bytes(S, b, n, g, d, e)
    keys = 2 * (fam_key_rows(T, m.fam_len) + S) * b * g * d * e.act  # its outputs keys, values [R + S, b, g, d]
    if held:
        keys += 2 * T * (m.fam_len + m.block_size) * b * g * d * e.act
    return _scan_rows_bytes(m, S, b, tp, shard, e, fam_rows=False) + keys


def _block_kv_bytes(S: int, b: int, n: int, g: int, d: int, e: Bytes) -> int:
    """k (after RoPE) and v, a view that keeps the whole QKV output [S, b, (n + 2g) d]."""
    return S * b * g * d * e.act + S * b * (n + 2 * g) * d * e.act


def _scan_rows_bytes(m: ModelArgs, S: int, b: int, tp: int, shard: int, e: Bytes, fam_rows: bool = True) -> int:
    """What FAMScan keeps besides its keys and values: each step's `Activations` (T blocks and the
    prompt step), the prompt step's K/V [F, b, g, d] and (fam_rows) the FAM K/V [R, b, g, d]."""
    h, d, f, F = m.hidden_size, m.head_dim, m.ffn_size // tp, m.fam_len
    n, g = m.num_attention_heads // tp, m.query_groups // tp
    T = math.ceil(S / m.block_size)
    local = h * e.resid + h * 4  # the step's input FAM (stream dtype) and a (fp32): this rank's rows under SP
    whole = 2 * n * d * e.act + 2 * f * e.act + 2 * h * e.act + f * e.act  # q, x_proj; gate_up; x_qkv, x_fc1; x_fc2
    whole += n * 4  # the attention's log-sum-exp (fp32)
    activations = (T + 1) * b * (F // shard * local + F * whole)
    return activations + 2 * ((fam_key_rows(T, F) if fam_rows else 0) + F) * b * g * d * e.act


def scan_kept_bytes(m: ModelArgs, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                    bytes_: Bytes | None = None, kernels: str = "cuda") -> int:
    """Bytes one layer keeps from its forward to its backward besides its input, under recompute,
    when recompute keeps the FAM scan (model.recompute_fam_scan false, model/scan_stash.py): the
    scan's rows and its two F-row outputs. 0 when the scan is recomputed, without FAM, or on CPU
    (the eager scan)."""
    if m.recompute_fam_scan or not m.uses_fam or kernels != "cuda":
        return 0
    e = bytes_ or element_bytes("autocast", "bf16")
    shard = tp if sequence_parallel else 1
    outputs = 2 * (m.fam_len // shard) * micro_batch * m.hidden_size * e.resid  # F_T, the prompt stream's rows
    return _scan_rows_bytes(m, seq_len, micro_batch, tp, shard, e) + outputs


def layer_held_bytes(m: ModelArgs, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
                     bytes_: Bytes | None = None) -> int:
    """Bytes of a layer's LayerState (not saved by autograd): the last FAM, and the copied K/V of
    the last m blocks that the next call attends to (model/layer.py `_memory`)."""
    e = bytes_ or element_bytes("autocast", "bf16")
    if m.attention == "dense":
        return 0
    b, g = micro_batch, m.query_groups // tp
    held = m.fam_len // (tp if sequence_parallel else 1) * b * m.hidden_size * e.resid if m.uses_fam else 0
    keep = min(m.mem_blocks * m.block_size, seq_len)
    return held + 2 * keep * b * g * m.head_dim * e.act


@dataclass(frozen=True)
class HeadBytes:
    """The last stage's final norm, output layer and loss, one micro-batch."""

    saved: int  # kept from the forward to the loss backward
    forward: int  # transient at the loss in the forward
    backward: int  # transient in the loss backward


def head_bytes(m: ModelArgs, seq_len: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = False,
               bytes_: Bytes | None = None, kernels: str = "cuda", return_logits: bool = False) -> HeadBytes:
    """lm_loss over chunks (the training path), or the whole logits with `return_logits`."""
    e = bytes_ or element_bytes("autocast", "bf16")
    S, b, h = seq_len, micro_batch, m.hidden_size
    rows, vocab = S * b, m.vocab_size // tp
    shard = tp if sequence_parallel else 1
    normed = h * e.resid if kernels == "cpu" else 0
    saved = rows * (4 + normed + h * e.resid) // shard  # final norm: rstd, output
    weight = vocab * h
    # the output layer's weight gradient: autocast, bf16 then fp32, and the bf16 weight copy; bf16-mixed, the
    # running bf16 sum over the loss chunks and one chunk's bf16 gradient (the hook adds it to the fp32 buffer,
    # counted as `gradients`); bf16-zero, the bf16 gradient
    weight_temps = weight * (2 + 2 + 4) if e.casts_weights else weight * (2 * e.weight_grad or e.grad)
    softmax_kept = rows * vocab * 4 + rows * (1 + 8)  # fp32 softmax, target mask, target index
    if return_logits:
        logits = rows * vocab
        return HeadBytes(saved + softmax_kept, logits * e.act + (logits * 4 if e.act != 4 else 0),
                         logits * e.act + weight_temps)
    if sequence_parallel:  # the gathered [S, b, h], kept as the checkpointed chunks' input
        saved += rows * h * e.resid
    chunk = min(S, max(1, language_model.LOSS_CHUNK_ELEMENTS // (b * vocab)))
    chunk_logits = chunk * b * vocab
    if chunk == S:  # one chunk, not checkpointed: autograd saves what the loss needs
        saved += softmax_kept + (rows * h * e.act if e.autocast else 0)  # + the linear's bf16 input
    per_logit = e.act + (4 if e.act != 4 else 0)  # the logits and their fp32 copy
    return HeadBytes(saved, chunk_logits * per_logit + (weight * 2 if e.casts_weights else 0),
                     chunk_logits * per_logit + weight_temps)


def embedding_saved_bytes(seq_len: int, micro_batch: int) -> int:
    return seq_len * micro_batch * 8  # int64 token ids for the embedding's backward


def block_mask_bytes(m: ModelArgs, seq_len: int, kernels: str = "cuda") -> int:
    """FlexAttention's cached BlockMask (GPU only): index tensors per 128 x 128 block pair."""
    if m.attention == "dense" or kernels != "cuda":
        return 0
    C, F = m.block_size, (m.fam_len if m.uses_fam else 0)
    T = math.ceil(seq_len / C)
    pairs = math.ceil(seq_len / FLEX_BLOCK) * math.ceil((fam_key_rows(T, F) + seq_len) / FLEX_BLOCK)  # q x [R + S]
    return BLOCK_MASK_BYTES_PER_BLOCK * pairs
