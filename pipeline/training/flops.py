"""Model FLOPs per token (forward + backward) for BSWA, FAM and dense attention, and MFU.

Notation as in STYLE.md: s = seq_len, C = block size, m = memory blocks, F = FAM length,
h = hidden, n heads of size d, g query groups, L layers, V vocabulary.

Matmuls: each of the s block tokens and F FAM tokens per block goes through every layer's
matmul weights N_layer (QKV with GQA, output projection, the 3 SwiGLU matrices); only block
tokens reach the output layer (h·V). A matmul weight costs 2 FLOPs per token forward and 4
backward, hence the 6.

Attention: a query seeing k keys costs 2·n·d·k for QK^T and 2·n·d·k for AV forward, ×3 with
backward = 12·n·d·k per layer. Keys per query (docs/fam.md, "The mask"):
    block token i of block t: min(t, m)·C (memory) + F (previous FAM, or the learned prompt
                              at t = 0) + (i mod C) + 1 (causal within the block)
    FAM token of block t:     F + |block t| (memory is masked for FAM queries)
    dense attention:          token i sees i + 1 keys, F = 0.
Model FLOPs (what MFU counts) exclude activation recompute.
"""

from __future__ import annotations

import math

import torch

from model.config import ModelArgs

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12}


def layer_matmul_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """(inputs, outputs) of one layer's matmuls: QKV with g query groups, output, SwiGLU's fc1 and fc2."""
    h, n, g, d = args.hidden_size, args.num_attention_heads, args.query_groups, args.head_dim
    return [(h, (n + 2 * g) * d), (n * d, h), (h, 2 * args.ffn_size), (args.ffn_size, h)]


def layer_matmul_params(args: ModelArgs) -> int:
    """Matmul weights of one layer: attention (QKV with g query groups, output) and SwiGLU."""
    return sum(k * n for k, n in layer_matmul_shapes(args))


def attention_keys(args: ModelArgs, seq_len: int) -> tuple[int, int]:
    """(sum over block tokens of keys seen, sum over FAM tokens of keys seen) for one sample."""
    s = seq_len
    if args.attention == "dense":
        return s * (s + 1) // 2, 0
    C, m = args.block_size, args.mem_blocks
    F = args.fam_len if args.uses_fam else 0
    block_keys = fam_keys = 0
    for t in range(math.ceil(s / C)):
        c_t = min(C, s - t * C)  # the last block may be partial
        block_keys += c_t * (min(t, m) * C + F) + c_t * (c_t + 1) // 2
        fam_keys += F * (F + c_t)
    return block_keys, fam_keys


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training (fwd + bwd) model FLOPs per input token of a seq_len sample."""
    s, L, h = seq_len, args.num_layers, args.hidden_size
    F = args.fam_len if args.uses_fam else 0
    fam_tokens = F * math.ceil(s / args.block_size) if F else 0
    matmul = 6 * (L * layer_matmul_params(args) * (s + fam_tokens) + h * args.vocab_size * s)
    block_keys, fam_keys = attention_keys(args, s)
    attention = 12 * L * args.num_attention_heads * args.head_dim * (block_keys + fam_keys)
    return (matmul + attention) / s


def peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the configured value, else the table by GPU name, else None
    (CPU, or an unknown GPU: MFU is then reported as n/a rather than guessed)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, flops_token: float, peak: float | None, n_devices: int) -> float | None:
    """Model FLOPs utilisation of the whole job (tokens/s summed over all ranks)."""
    if peak is None:
        return None
    return tokens_per_s * flops_token / (peak * n_devices)
