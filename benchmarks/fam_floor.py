"""The best FAM can do against BSWA in this design: a cost model, not a measurement.

    python -m benchmarks.fam_floor --config fam-1b --seq-lens 8192 32768 65536 131072 --micro-batch 1 2

FAM's F memory tokens per block go through every layer's GEMMs beside the block's C tokens, and
attend (pipeline/training/flops.py): F/C = 6.25 % more GEMM FLOPs for fam-1b. At BSWA's own MFU,
FAM's step would be that much longer: the *FLOP ceiling* of fam / bswa (0.94 for fam-1b).

But two thirds of those extra GEMM FLOPs do not run at BSWA's MFU. The scan (model/fast_scan.py)
is sequential over the T blocks of a layer: each step's four GEMMs (forward, and again for the
activation gradients) have F x micro-batch rows and read all the layer's matmul weights, T + 1
times per layer (the soft prompt's step). An F-row GEMM is bound by reading its weights, not by
its FLOPs (64 FLOPs per weight byte read, against an H200's ~206 at full bandwidth): fam-1b reads
132 MB of bf16 weights per layer and step, 43 GB per training step at 8k tokens, 8.9 ms at an
H200's 4.8 TB/s, while those GEMMs' FLOPs take 2.8 ms at peak. Only the weight gradients of the
FAM rows are one large GEMM per weight after the scan (model/fast_scan.py), at BSWA's MFU.

The *floor* of the step is then
    BSWA's step x (FAM's FLOPs - the scan's F-row GEMM FLOPs) / BSWA's FLOPs
    + the scan's GEMMs at full bandwidth (or at peak FLOPs, whichever is longer),
with nothing else in the scan: no attention, norm, RoPE or elementwise kernel, no launch gap.
*Slack at 0.9x* is what that leaves for all of those per step before fam / bswa drops below 0.9.
Both grow with the sequence like BSWA's own cost, so the ratio hardly moves with length. The weight
reads are shared by the micro-batch's rows, so a micro-batch of 2 halves their share.

(Stop 25's version added the scan's weight reads on top of *all* of FAM's extra FLOPs at BSWA's
MFU, counting the scan's F-row GEMMs twice: it gave 0.898-0.910 at micro-batch 1, under 0.9.)

Where BSWA's step time is not given (`--bswa-tokens-per-s`, one per sequence), it is taken at
`--bswa-mfu` of the card's peak (default 0.42: bswa-1b at 8k on an H200, 2026-11-30).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from model import load_model_args
from pipeline.training.flops import PEAK_BF16_FLOPS, flops_per_token, layer_matmul_params

H200_BANDWIDTH_TBS = 4.8  # HBM3e, datasheet


@dataclasses.dataclass
class Floor:
    seq: int
    micro_batch: int
    blocks: int  # T
    flop_ceiling: float  # bswa FLOPs / fam FLOPs per token
    scan_gb: float  # weights the scan reads per step, GB
    scan_ms: float  # the scan's F-row GEMMs: their reads at full bandwidth, or their FLOPs at peak
    bswa_ms: float  # BSWA's step
    floor_ms: float  # the fastest fam step: BSWA's, scaled by the FLOPs outside the scan, + scan_ms
    floor: float  # bswa step / floor_ms
    slack_ms: float  # what fam's step may spend on everything else and stay at 0.9x bswa


def scan_weight_bytes(args, seq: int, weight_bytes: int = 2) -> int:
    """Bytes of matmul weights the FAM scan reads per training step: every layer's weights, per
    step (T blocks + the prompt step), forward and backward."""
    steps = math.ceil(seq / args.block_size) + 1
    return 2 * args.num_layers * steps * layer_matmul_params(args) * weight_bytes


def scan_gemm_flops(args, seq: int) -> int:
    """FLOPs of the scan's F-row GEMMs per sample: forward and activation gradients (2 + 2 per
    weight and row) of the F FAM rows of each block, in every layer (the weight gradients are not
    in the scan). Only FAM rows of the T blocks: FAM's FLOP count (flops_per_token) has no prompt step."""
    fam_rows = args.fam_len * math.ceil(seq / args.block_size)
    return 4 * args.num_layers * layer_matmul_params(args) * fam_rows


# shape: the model, one row's sizes, and the card's figures
def floor_row(fam_args, seq: int, micro_batch: int, bandwidth_tbs: float, peak_flops: float,
              bswa_mfu: float, bswa_tokens_per_s: float | None = None) -> Floor:
    bswa_args = dataclasses.replace(fam_args, fam_len=0)
    fam_flops, bswa_flops = flops_per_token(fam_args, seq), flops_per_token(bswa_args, seq)
    tokens = micro_batch * seq
    bswa_s = tokens / bswa_tokens_per_s if bswa_tokens_per_s else tokens * bswa_flops / (bswa_mfu * peak_flops)
    scan_bytes = scan_weight_bytes(fam_args, seq)
    scan_flops = scan_gemm_flops(fam_args, seq)
    scan_s = max(scan_bytes / (bandwidth_tbs * 1e12), micro_batch * scan_flops / peak_flops)
    outside_scan = (fam_flops - scan_flops / seq) / bswa_flops  # FLOPs that run as BSWA's do
    floor_s = bswa_s * outside_scan + scan_s
    return Floor(seq, micro_batch, math.ceil(seq / fam_args.block_size), bswa_flops / fam_flops, scan_bytes / 1e9,
                 scan_s * 1e3, bswa_s * 1e3, floor_s * 1e3, bswa_s / floor_s, (bswa_s / 0.9 - floor_s) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fam-1b")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 32768, 65536, 131072])
    parser.add_argument("--micro-batch", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=32000, help="as benchmarks.train_step's rows")
    parser.add_argument("--bandwidth-tbs", type=float, default=H200_BANDWIDTH_TBS, help="HBM bandwidth, TB/s")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_FLOPS["H200"] / 1e12)
    parser.add_argument("--bswa-mfu", type=float, default=0.42)
    parser.add_argument("--bswa-tokens-per-s", nargs="+", type=float,
                        help="measured bswa tokens/s, one per --seq-lens: at the one --micro-batch given, or at "
                             "micro-batch 1 when several are")
    opts = parser.parse_args()
    for flag in ("seq_lens", "micro_batch", "bandwidth_tbs", "peak_tflops", "bswa_mfu", "bswa_tokens_per_s"):
        values = getattr(opts, flag)
        values = values if isinstance(values, list) else [values]
        if any(v is not None and v <= 0 for v in values):
            parser.error(f"--{flag.replace('_', '-')} {' '.join(map(str, values))}: every value must be > 0")
    if opts.bswa_tokens_per_s and len(opts.bswa_tokens_per_s) != len(opts.seq_lens):
        parser.error(f"--bswa-tokens-per-s: {len(opts.bswa_tokens_per_s)} values for {len(opts.seq_lens)} "
                     "--seq-lens; give one per sequence")
    try:
        args = load_model_args(opts.config, vocab_size=opts.vocab_size)
    except ValueError as err:  # an unknown config: the message names it and lists the known ones
        parser.error(f"--config: {err}")
    if not args.uses_fam:
        parser.error(f"--config {opts.config}: not a FAM config (model.fam_len is 0)")
    measured = dict(zip(opts.seq_lens, opts.bswa_tokens_per_s or []))
    bswa = "the measured tokens/s" if measured else f"{opts.bswa_mfu:.0%} MFU"
    print(f"{opts.config}: {layer_matmul_params(args) * 2 / 1e6:.0f} MB of bf16 matmul weights per layer, "
          f"{opts.bandwidth_tbs} TB/s, BSWA at {bswa}")
    print("| sequence | micro-batch | blocks | FLOP ceiling | scan weight reads | scan GEMMs at full bandwidth "
          "| BSWA step | fastest FAM step | floor | slack at 0.9x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq in opts.seq_lens:
        for b in opts.micro_batch:
            tps = measured.get(seq) if b == 1 or len(opts.micro_batch) == 1 else None
            r = floor_row(args, seq, b, opts.bandwidth_tbs, opts.peak_tflops * 1e12, opts.bswa_mfu, tps)
            print(f"| {seq:,} | {b} | {r.blocks} | {r.flop_ceiling:.3f} | {r.scan_gb:.1f} GB | {r.scan_ms:.1f} ms | "
                  f"{r.bswa_ms:.0f} ms | {r.floor_ms:.0f} ms | {r.floor:.3f} | {r.slack_ms:.1f} ms |")


if __name__ == "__main__":
    main()
