"""benchmarks.train_step's micro-chunk rows (issue 14): long sequences trained in micro-chunks.

    python -m benchmarks.train_step --configs fam-1b bswa-1b --seq-lens 8192 131072 1048576 \
        --micro-chunk-len 16384 --mode exact truncated --json micro_chunks.json

Each cell: one sequence (micro-batch 1) through model/micro_chunks.py in the given mode (exact: the
whole call's gradients, truncated: detached at every boundary), then the optimizer step, in the
training step's precision (`--precision`, as train_step's rows: bf16-mixed by default, bf16 weights
with fp32 master weights and fp32 gradient buffers allocated once, as training runs it;
benchmarks/step_optimizer.py), timed over `--steps` steps (one from 256k tokens on) after a warm-up
step on a sequence of at most two micro-chunks (every micro-chunk has the same shape, so the warm-up
compiles what the long sequence runs; a million-token warm-up would double the run). A dense config
(no state to pass) runs whole calls, mode "whole", for contrast. Recompute is chosen per config and
mode by the memory estimate (pipeline/memory/estimate.py) at the longest sequence: off when the
estimate without it fits the GPU, so a config's rows compare (`--recompute on|off` fixes it
instead). With --micro-chunk-len 8192 the 8k row is one micro-chunk of the same shape as every
micro-chunk of the longer rows. Printed per row: tokens/s, model TFLOP/s, peak memory and the
estimate's peak for that precision; the JSON records carry train_step.json's fields plus `mode`,
`micro_chunk_len`, `estimate_gib` and `precision`.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from model import (build_model, compile_limits, fast_scan, load_model_args, mlp, rope, scan_graphs, scan_slots,
                   scan_step)
from benchmarks.step_optimizer import build_step_optimizer, step_autocast
from data_prep.manifest import write_json_atomic
from model.micro_chunks import micro_chunked_forward_backward
from pipeline.memory.cli import estimated_precision
from pipeline.memory.estimate import DEFAULT_ALLOWANCE_GIB, GIB, Settings, estimate
from pipeline.training.flops import flops_per_token, peak_flops

MODES = ("exact", "truncated")
LEAK_WARN_GIB = 0.25  # left allocated after a cell's cleanup: later cells' peaks would include it
LONG = 262144  # sequences from here on are timed over one step (>= 16 micro-chunks of 16k)


def add_micro_chunk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--micro-chunk-len", type=int, default=0,
                        help="train each sequence in micro-chunks of this many tokens (0: whole calls)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["exact", "truncated"],
                        help="micro-chunk modes to measure (with --micro-chunk-len)")


def estimate_gib(args, seq: int, chunk: int, mode: str, precision: str = "bf16-mixed") -> float:
    """pipeline.memory's peak for this cell (train.precision `precision` as pipeline.memory
    resolves it without ZeRO, CUDA kernels as this process runs them, micro-batch 1), GiB."""
    estimator_precision, dtype = estimated_precision(precision, zero=0)
    settings = Settings(micro_batch=1, seq_len=seq, recompute=args.recompute, micro_chunk_len=chunk if
                        mode != "whole" else 0, micro_chunk_mode=mode if mode != "whole" else "exact",
                        precision=estimator_precision, dtype=dtype, swiglu="fused" if mlp.FUSED else "eager")
    return estimate(args, settings).peak / GIB


def choose_recompute(name: str, seq: int, chunk: int, mode: str, vocab: int, gpu_gib: float,
                     precision: str = "bf16-mixed") -> bool:
    args = load_model_args(name, vocab_size=vocab, recompute=False)
    return estimate_gib(args, seq, chunk, mode, precision) + DEFAULT_ALLOWANCE_GIB > gpu_gib


def pick_recompute(opts, name: str, mode: str, gpu_gib: float) -> bool:
    """--recompute on/off as given (a run split over several commands keeps one setting); auto: by the
    estimate at the longest sequence, so a config and mode keep one setting and their rows compare."""
    if opts.recompute != "auto":
        return opts.recompute == "on"
    return choose_recompute(name, max(opts.seq_lens), opts.micro_chunk_len, mode, opts.vocab_size, gpu_gib,
                            opts.precision)


# benchmarks.train_step --recompute-fam-scan on|off: every cell's model with model.recompute_fam_scan
# set (model/scan_stash.py; None: the config's), in whole calls and micro-chunks alike; rows say so (row_notes).
RECOMPUTE_FAM_SCAN: bool | None = None
# benchmarks.train_step --fam-scan-overlap: model.overlap_fam_scan of every cell (None: the config's).
OVERLAP_FAM_SCAN: bool | None = None


def cell_model_args(name: str, vocab: int, recompute: bool):
    """A benchmark cell's ModelArgs: the named config at this vocabulary and recompute setting."""
    settings = dict(recompute_fam_scan=RECOMPUTE_FAM_SCAN, overlap_fam_scan=OVERLAP_FAM_SCAN)
    over = {key: value for key, value in settings.items() if value is not None}
    return load_model_args(name, vocab_size=vocab, recompute=recompute, **over)


# shape: one cell's settings as the CLI gives them, plus the device (cpu in tests)
def run_chunk_cell(name: str, seq: int, chunk: int, mode: str, vocab: int, recompute: bool, steps: int,
                   device: str = "cuda", precision: str = "bf16-mixed") -> dict:
    """One cell's figures; `device` cpu runs the same code without timing the GPU (tests)."""
    args = cell_model_args(name, vocab, recompute)
    model = build_model(args, device=device)
    opt = build_step_optimizer(model, precision)  # the buffers of bf16-mixed are allocated here, once
    cuda = device == "cuda"

    def step(length: int) -> float:
        tokens = torch.randint(0, vocab, (1, length + 1), device=device)
        with step_autocast(device, precision):
            if mode == "whole":
                loss = model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss
                loss.backward()
            else:
                loss = micro_chunked_forward_backward(model, tokens[:, :-1], tokens[:, 1:], chunk,
                                                      truncated=mode == "truncated").loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step(min(seq, 2 * chunk) if mode != "whole" else seq)  # warm-up: compiles every shape the cell runs
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(seq)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    flops = seq * flops_per_token(args, seq) / seconds
    peak = peak_flops(torch.device(device)) if cuda else None
    return {"tokens_per_s": seq / seconds, "tflops": flops / 1e12, "mfu": flops / peak if peak else float("nan"),
            "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"), "loss": loss,
            "recompute": recompute, "mode": mode, "micro_chunk_len": chunk if mode != "whole" else 0,
            "precision": precision, "estimate_gib": estimate_gib(args, seq, chunk, mode, precision)}


def micro_chunk_rows(opts) -> list[dict]:
    """Every (sequence, config, mode) cell, printed as it finishes; an OOM is a row too."""
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    rows = []
    for seq in opts.seq_lens:
        for name in opts.configs:
            dense = load_model_args(name).attention == "dense"
            for mode in ["whole"] if dense else opts.mode:
                recompute = pick_recompute(opts, name, mode, gpu_gib)
                steps = opts.steps if seq < LONG else 1  # one long step averages over its many micro-chunks
                before = torch.cuda.memory_allocated()
                try:
                    result = run_chunk_cell(name, seq, opts.micro_chunk_len, mode, opts.vocab_size, recompute, steps,
                                            precision=opts.precision)
                except torch.OutOfMemoryError:
                    result = {"oom": True, "recompute": recompute, "mode": mode,
                              "micro_chunk_len": opts.micro_chunk_len, "precision": opts.precision}
                rows.append({"config": name, "seq_len": seq, **result, **row_notes(release_cell(before))})
                print(rows[-1], flush=True)
                if opts.json:  # after every cell: a run stopped by its time limit keeps its rows
                    save_rows(rows, opts.json)
    return rows


def release_cell(before: int, allocated=torch.cuda.memory_allocated) -> float:
    """Free what a finished cell built (the scan's static buffers and graphs, unreachable cycles,
    cached blocks) and return the GiB still allocated beyond `before` (`allocated()` when the cell
    began), printed when over LEAK_WARN_GIB: every later cell's peak would include it. (A leak of
    21.6 GiB per cell, the model and optimizer of each, once filled the card by the fifth cell.)"""
    scan_graphs.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    left = (allocated() - before) / GIB
    if left > LEAK_WARN_GIB:
        print(f"WARNING: the cell left {left:.1f} GiB allocated; the peaks of the cells after it include it",
              flush=True)
    return left


def row_notes(left_gib: float) -> dict:
    """What a row records beside its figures, when it applies: `leaked_gib` (release_cell found a
    leak), `scan_compile_mode` (always: how the FAM scan's steps were compiled, model/fast_scan.py COMPILE_MODE;
    rows without it: "default", before 2026-12-02) and
    `fused_ops` (the QKV split, RoPE and SwiGLU ran as compiled kernels: model/rope.py, model/mlp.py),
    `fused_op_shapes` ("dynamic" when they were compiled for dynamic shapes only) and
    `recompute_fam_scan` and `overlap_fam_scan` (when RECOMPUTE_FAM_SCAN, OVERLAP_FAM_SCAN set them),
    `scan_weights` ("copied" when the scan's graphs copy the weights in, as before 2026-12),
    `scan_slots` ("off" when the scan's kept activations went through the shared buffers, as before 2026-12-01) and
    `scan_attention` (always: "flash" or "cudnn" where the scan's steps ran that fused kernel, "matmul" where
    they ran the matrix products everywhere; rows without it ran the matrix products, as before 2026-12) and
    `scan_blocks` (always: "held" where the scan's backward read the keys/values buffers its forward wrote, "reloaded"
    where it loaded them again; rows without it reloaded them, as before 2026-12-02) and `scan_first_step`
    ("merged" where block 0's step and the prompt step ran as one, model/scan_first_step.py)."""
    notes = {"leaked_gib": left_gib} if left_gib > LEAK_WARN_GIB else {}
    notes["scan_compile_mode"] = fast_scan.COMPILE_MODE or "default"
    if rope.FUSED or mlp.FUSED:
        notes["fused_ops"] = True
        if not compile_limits.STATIC_SHAPES:
            notes["fused_op_shapes"] = "dynamic"
    if RECOMPUTE_FAM_SCAN is not None:
        notes["recompute_fam_scan"] = RECOMPUTE_FAM_SCAN
    if OVERLAP_FAM_SCAN is not None:
        notes["overlap_fam_scan"] = OVERLAP_FAM_SCAN
    if not fast_scan.WEIGHTS_IN_PLACE:
        notes["scan_weights"] = "copied"
    if not scan_slots.MAX_SLOTS:
        notes["scan_slots"] = "off"
    notes["scan_attention"] = scan_step.FUSED_KERNEL if scan_step.FLASH else "matmul"
    notes["scan_blocks"] = "held" if fast_scan.HOLD_BLOCKS else "reloaded"
    if fast_scan.MERGED_FIRST_STEP:
        notes["scan_first_step"] = "merged"
    return notes


def save_rows(rows: list[dict], path: str) -> None:
    """The rows as a JSON list, written after every cell (a run stopped by its time limit keeps them).
    A missing folder is made: a GPU cell's rows must not be lost for want of it. Written whole
    (data_prep.manifest.write_json_atomic): a run killed mid-write keeps the last rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(path), rows, sort_keys=False)


def format_micro_chunk_table(rows: list[dict], vocab: int, precision: str) -> str:
    lines = [f"{torch.cuda.get_device_name()}, {precision}, micro-batch 1, vocab {vocab}",
             "| config | sequence | mode | micro-chunk | tokens/s | model TFLOP/s | peak memory | estimate | recompute |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['config']} | {r['seq_len']:,} | {r['mode']} | {r['micro_chunk_len'] or '-'} |"
        if r.get("oom"):
            lines.append(head + f" out of memory | | | | {r['recompute']} |")
            continue
        lines.append(head + f" {r['tokens_per_s'] / 1e3:.1f}k | {r['tflops']:.0f} | {r['peak_gib']:.1f} GiB | "
                            f"{r['estimate_gib']:.1f} GiB | {r['recompute']} |")
    return "\n".join(lines)


def acceptance_lines(rows: list[dict]) -> list[str]:
    """Issue 14's GPU bars from the rows, per config: truncated at the longest sequence against
    8k (peak <= 1.1x, tokens/s >= 0.9x), exact against its 64k peak (<= 2x) and the truncated
    speed (>= 0.7x), and the estimate against every measured peak (within 15 %)."""
    cell = {(r["config"], r["mode"], r["seq_len"]): r for r in rows if not r.get("oom")}
    lines = []
    for name in dict.fromkeys(r["config"] for r in rows):
        seqs = sorted(q for c, _, q in cell if c == name)
        if not seqs:
            continue
        top, t, e = seqs[-1], cell.get((name, "truncated", seqs[-1])), cell.get((name, "exact", seqs[-1]))
        checks = []
        if t and (name, "truncated", 8192) in cell:
            base = cell[(name, "truncated", 8192)]
            checks.append(f"truncated peak {t['peak_gib'] / base['peak_gib']:.2f}x of 8k (<= 1.1), "
                          f"tokens/s {t['tokens_per_s'] / base['tokens_per_s']:.2f}x (>= 0.9)")
        if e and (name, "exact", 65536) in cell:
            checks.append(f"exact peak {e['peak_gib'] / cell[(name, 'exact', 65536)]['peak_gib']:.2f}x of 64k (<= 2)")
        if e and t:
            checks.append(f"exact tokens/s {e['tokens_per_s'] / t['tokens_per_s']:.2f}x truncated (>= 0.7)")
        worst = max(abs(r["estimate_gib"] / r["peak_gib"] - 1) for (c, _, _), r in cell.items() if c == name)
        checks.append(f"estimate within {worst:.0%} of every peak (<= 15 %)")
        lines.append(f"{name} at {top:,}: " + "; ".join(checks))
    return lines


def run_micro_chunk_benchmark(opts) -> None:
    """benchmarks.train_step with --micro-chunk-len: the rows, their JSON records, the table."""
    rows = micro_chunk_rows(opts)
    print()
    print(format_micro_chunk_table(rows, opts.vocab_size, opts.precision))
    print("\n".join(acceptance_lines(rows)))
