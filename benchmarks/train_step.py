"""Training-step speed and memory of FAM, BSWA and dense models, in one run, on one GPU.

    python -m benchmarks.train_step --configs fam-1b bswa-1b dense-1b --seq-lens 8192 32768 65536

Each cell: forward + backward + AdamW step of the trainer's path, micro-batch 1 (`--micro-batch`
sets another; rows say so), after warm-up steps (which also absorb torch.compile of FlexAttention).
`--loss chunked` (default) computes the loss as training does (lm_loss, no logits kept); `--loss
whole` from whole logits, as the anchor does and as every row before 2026-12 was measured.
`--precision bf16-mixed` (default: bf16 weights, fp32 master weights and AdamW,
pipeline/training/precision.py) or `bf16-autocast` (fp32 weights cast at each use; fused AdamW).
Prints tokens/s, model TFLOP/s (FLOPs counted for windowed attention + FAM tokens,
pipeline/training/flops.py) and peak memory. The vocabulary defaults to
32k; say so when quoting the numbers.
`--recompute auto` recomputes activations at 64k and beyond, and wherever a cell would not fit without it.
`--profile` adds three profiled steps per cell (benchmarks/profiling.py): kernels launched per step
and the GPU-busy fraction (the time some kernel ran over the unprofiled step's wall time; the table adds
kernel and idle ms per step and the kernel-time ratio to bswa), the CPU's
time to issue a step and the calls in it that waited for the GPU, then the operators that launched
the kernel time, with their input shapes. Under the table, each row's idle time between kernels by gap
size and the three kernel pairs with the most idle time between them (benchmarks/profiling.py idle_gaps).
`--json PATH` writes every cell's raw figures as a JSON list (with --profile: every kernel by name,
to diff two configs).
`--anchor [PATH]` runs the shared plain-PyTorch anchor (default ../shared/gpu/anchor_gpt.py) in this
process at each row's shape, attention and sequence, and prints each row's ratio to it
(benchmarks/anchor_rows.py); with --profile the anchor's step is profiled too, so a famtron row
and its anchor can be diffed kernel by kernel. The rows (with the anchor's beside them) are always
saved as `<--results-dir>/<date>-<card>/train_step.json`.
`--compile-cache DIR` starts from the compiled graphs and kernels of earlier runs in DIR and adds this
run's (benchmarks/compile_cache.py), so that a fresh machine with the same torch and card would skip the
compiling; tried once on an H200, it did not (see benchmarks/compile_cache.py).
`--scan-compile-mode` compiles the FAM scan's steps in another torch.compile mode (model/fast_scan.py).
The QKV split, RoPE and SwiGLU run as compiled kernels (model/rope.py, model/mlp.py FUSED, the default
since 2026-12); `--eager-ops` runs megatron's eager ops instead, as the rows before it did (rows say which:
`fused_ops`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks import micro_chunk_step
from benchmarks.micro_chunk_step import (add_micro_chunk_arguments, cell_model_args, release_cell, row_notes,
                                         run_micro_chunk_benchmark, save_rows)
from benchmarks.compile_cache import CompileCache
from benchmarks.profiling import profile_kernels
from benchmarks.step_optimizer import build_step_optimizer, step_autocast
from model import build_model, compile_limits, fast_scan, load_model_args, mlp, rope, scan_slots, scan_step
from benchmarks.anchor_rows import DEFAULT_ANCHOR, load_anchor, run_anchor, to_record, write_records
from pipeline.training.flops import flops_per_token, peak_flops


def step_loss(model, tokens: torch.Tensor, loss_path: str = "chunked") -> torch.Tensor:
    """The loss of one micro-batch as training computes it ("chunked": lm_loss, no logits kept,
    pipeline/training/plain_step.py), or from whole logits ("whole": model(...) as an API user
    calls it, the path of every train_step row before 2026-12)."""
    return model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=loss_path == "whole").loss


# shape: one benchmark cell's settings, as the CLI gives them
def run_cell(name: str, seq: int, vocab: int, recompute: bool, warmup: int, steps: int, profile: bool = False,
             precision: str = "bf16-mixed", loss_path: str = "chunked", micro_batch: int = 1,
             trace_dir: str | None = None) -> dict:
    args = cell_model_args(name, vocab, recompute)
    model = build_model(args, device="cuda")
    opt = build_step_optimizer(model, precision)
    tokens = torch.randint(0, vocab, (micro_batch, seq + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with step_autocast("cuda", precision):
            loss = step_loss(model, tokens, loss_path)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    flops, tokens_per_step = flops_per_token(args, seq), micro_batch * seq
    profiled = {}
    if profile:
        trace = trace_dir and Path(trace_dir) / trace_name(name, seq, micro_batch, recompute)
        profiled = profile_kernels(step, wall_seconds=seconds, trace_path=trace)
    return {
        **profiled,
        "tokens_per_s": tokens_per_step / seconds,
        "tflops": tokens_per_step * flops / seconds / 1e12,
        "mfu": tokens_per_step * flops / seconds / (peak_flops(torch.device("cuda")) or float("nan")),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": loss.item(),
        "recompute": recompute,
        "loss_path": loss_path,
        **({"micro_batch": micro_batch} if micro_batch != 1 else {}),
    }


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["fam-1b", "bswa-1b", "dense-1b"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 32768, 65536])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--recompute", nargs="+", choices=["auto", "on", "off"], default=["auto"],
                        help="layer recompute: auto (below 64k off unless it runs out of memory, on from 64k), on "
                             "or off; one for every --seq-lens, or one per length in their order (fam / bswa rows "
                             "alike: --seq-lens 8192 32768 --recompute off on)")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1],
                        help="sequences per step (the FAM scan's weight reads serve all of them): one for every "
                             "--seq-lens, or one per length in their order (issue 13's rows side by side: "
                             "--seq-lens 8192 32768 --micro-batch 4 2); the anchor runs micro-batch 1 only")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step: GPU-busy fraction, kernels per step, the costliest kernels")
    parser.add_argument("--trace", metavar="DIR",
                        help="with --profile, save each cell's profiled step as a gzipped Chrome trace in DIR "
                             "(CONFIG-SEQ-mbB[-recompute].trace.json.gz; benchmarks/profiling.py save_trace)")
    parser.add_argument("--json", help="write the raw rows to this file")
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="load the torch.compile caches of earlier runs from DIR and add this run's "
                             "(benchmarks/compile_cache.py); DIR is made if missing")
    parser.add_argument("--loss", choices=["chunked", "whole"], default="chunked",
                        help="chunked: the trainer's lm_loss (default); whole: the loss from whole logits, as "
                             "train_step measured before 2026-12 and as the anchor computes it")
    add_kernel_arguments(parser)
    add_anchor_arguments(parser)
    add_micro_chunk_arguments(parser)  # issue 14: --micro-chunk-len, --mode (benchmarks/micro_chunk_step.py)
    opts = parser.parse_args()
    check_micro_batch(parser, opts)
    check_per_length(parser, "--recompute", opts.recompute, opts.seq_lens)
    if opts.micro_chunk_len:  # one setting for the whole micro-chunk benchmark (micro_chunk_step.pick_recompute)
        if len(opts.recompute) > 1:
            parser.error(f"--recompute {' '.join(opts.recompute)}: give one value with --micro-chunk-len")
        opts.recompute = opts.recompute[0]
    if opts.trace and not opts.profile:
        parser.error(f"--trace {opts.trace}: traces are taken of the profiled step; add --profile")
    return opts


def trace_name(name: str, seq: int, micro_batch: int, recompute: bool) -> str:
    return f"{name}-{seq}-mb{micro_batch}{'-recompute' * recompute}.trace.json.gz"


def main() -> None:
    opts = parse_options()
    anchor = load_anchor(opts.anchor) if opts.anchor else None  # a wrong path fails before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.train_step measures GPU speed: no CUDA device here")
    apply_kernel_options(opts)
    cache = CompileCache(opts.compile_cache) if opts.compile_cache else None
    if cache:
        cache.load()
    if opts.micro_chunk_len:
        try:
            return run_micro_chunk_benchmark(opts)
        finally:
            if cache:
                cache.save()
    rows, records, anchors = [], [], {}
    for seq, micro_batch, recompute_mode in zip(opts.seq_lens, micro_batches(opts), per_length(opts.recompute,
                                                                                            opts.seq_lens)):
        for name in opts.configs:
            auto = [True] if seq >= 65536 else [False, True]  # 64k+ never fits a 1B model without it
            tries = {"auto": auto, "on": [True], "off": [False]}[recompute_mode]
            for recompute in tries:
                before = torch.cuda.memory_allocated()
                try:
                    result = run_cell(name, seq, opts.vocab_size, recompute, opts.warmup, opts.steps, opts.profile,
                                      opts.precision, opts.loss, micro_batch, opts.trace)
                    break
                except torch.OutOfMemoryError:
                    result = {"oom": True, "recompute": recompute, **({"micro_batch": micro_batch} if micro_batch != 1
                                                                       else {})}
                finally:
                    left = release_cell(before)  # the scan's buffers and graphs, cycles, the cache
            result.update(row_notes(left))
            rows.append((name, seq, result))
            print(name, seq, {k: v for k, v in result.items() if k not in ("kernels", "ops")}, flush=True)
            records.append(anchor_record(anchor, anchors, opts, name, seq, result))
            saved = write_records(records, opts.results_dir)  # after every cell: a killed run keeps its rows
            if cache:
                cache.save()  # likewise its compiled graphs
            for kernel, launches, ms in result.get("kernels", [])[:8]:
                print(f"    {ms:8.1f} ms {launches:8,.0f} x  {kernel}")
            for op, shapes, calls, ms in result.get("ops", [])[:8]:
                print(f"    {ms:8.1f} ms {calls:8,.0f} x  {op} {shapes[:100]}")
            if opts.json:  # each row with its anchor's row beside it, as in the results folder's records
                save_rows([dict(config=n, seq=q, **r, **_anchor_part(rec)) for (n, q, r), rec in zip(rows, records)],
                          opts.json)

    print(f"rows saved in {saved}")
    print_anchor_ratios(records)
    print_table(rows, opts)


def per_length(values: list, seq_lens: list[int]) -> list:
    """A per-length option's value for each --seq-lens entry: one value for all, or one each."""
    return list(values) * len(seq_lens) if len(values) == 1 else list(values)


def micro_batches(opts) -> list[int]:
    """The micro-batch of each --seq-lens entry: one value for all, or one each."""
    return per_length(opts.micro_batch, opts.seq_lens)


def check_per_length(parser: argparse.ArgumentParser, flag: str, values: list, seq_lens: list[int]) -> None:
    if len(values) not in (1, len(seq_lens)):
        parser.error(f"{flag} {' '.join(map(str, values))}: give one value, or one per --seq-lens entry "
                     f"({len(seq_lens)})")


def check_micro_batch(parser: argparse.ArgumentParser, opts) -> None:
    given = " ".join(map(str, opts.micro_batch))
    check_per_length(parser, "--micro-batch", opts.micro_batch, opts.seq_lens)
    if min(opts.micro_batch) < 1 or (max(opts.micro_batch) > 1 and (opts.anchor or opts.micro_chunk_len)):
        parser.error(f"--micro-batch {given}: must be >= 1, and 1 with --anchor or --micro-chunk-len "
                     "(they measure micro-batch 1)")


def add_kernel_arguments(parser: argparse.ArgumentParser) -> None:
    """How the model's kernels are built: the scan's compile mode, the compiled or eager pointwise ops."""
    parser.add_argument("--scan-compile-mode", choices=["combo-kernels", "default", "max-autotune-no-cudagraphs"],
                        default="combo-kernels",
                        help="how the FAM scan's steps are compiled: with inductor's combo kernels (the default since "
                             "2026-12-02), torch.compile's default mode (as before) or another mode "
                             "(model/fast_scan.py COMPILE_MODE)")
    parser.add_argument("--eager-ops", action="store_true",
                        help="the QKV split, RoPE and SwiGLU as eager ops (megatron's), not the default compiled "
                             "kernels (model/rope.py, model/mlp.py FUSED), as train_step measured before 2026-12")
    parser.add_argument("--fused-op-shapes", choices=["static", "dynamic"], default="static",
                        help="torch.compile shapes of the compiled QKV split + RoPE and SwiGLU: static (a graph per "
                             "length for the first 8 lengths, the default) or dynamic (one graph for every length, "
                             "as train_step measured on 2026-11-30; model/compile_limits.py STATIC_SHAPES)")
    parser.add_argument("--recompute-fam-scan", choices=["config", "on", "off"], default="config",
                        help="model.recompute_fam_scan: with recompute, run the FAM scan again (on) or keep its rows "
                             "from the forward (off, the default; model/scan_stash.py); config: as the config says")
    parser.add_argument("--scan-weights", choices=["in-place", "copied"], default="in-place",
                        help="the FAM scan's CUDA graphs read bf16 weights in place, each layer's own graphs (the "
                             "default), or copy them into buffers shared by all layers, as before 2026-12 "
                             "(model/fast_scan.py WEIGHTS_IN_PLACE)")
    parser.add_argument("--scan-slots", choices=["on", "off"], default="on",
                        help="each FAM scan call keeps its activations in its own slot, read in place by the "
                             "backward (on, the default since 2026-12-01), or in the shared buffers, cloned out and "
                             "copied back, as before (model/scan_slots.py MAX_SLOTS = 0)")
    parser.add_argument("--scan-blocks", choices=["held", "reloaded"], default="held",
                        help="the FAM scan's backward reads the keys/values buffers its forward wrote, held per call "
                             "without recompute (held, the default since 2026-12-02), or loads them again from k, v "
                             "and the FAM rows, as before (model/fast_scan.py HOLD_BLOCKS)")
    parser.add_argument("--scan-attention", choices=["flash", "cudnn", "matmul"], default="flash",
                        help="the FAM scan steps' attention: flash attention where it applies (the default since "
                             "2026-12), cuDNN's fused attention there instead (model/scan_step.py FUSED_KERNEL), "
                             "or the matrix products and softmax everywhere, as before (model/scan_step.py FLASH)")
    parser.add_argument("--scan-first-step", choices=["separate", "merged"], default="separate",
                        help="from the prompt, block 0's scan step and the prompt step as two steps (the default) or "
                             "one, with one QKV GEMM and the projection and FFN over both steps' rows "
                             "(model/scan_first_step.py, fast_scan.py MERGED_FIRST_STEP; no faster on an H200)")
    parser.add_argument("--fam-scan-overlap", choices=["config", "on", "off"], default="config",
                        help="model.overlap_fam_scan: the FAM scan on a second CUDA stream beside the window part "
                             "of the block attention (on) or one attention call after the scan (off); config: "
                             "as the config says (model/split_attention.py)")


def apply_kernel_options(opts) -> None:
    fast_scan.COMPILE_MODE = None if opts.scan_compile_mode == "default" else opts.scan_compile_mode
    fast_scan.WEIGHTS_IN_PLACE = opts.scan_weights == "in-place"
    fast_scan.HOLD_BLOCKS = opts.scan_blocks == "held"
    scan_slots.MAX_SLOTS = scan_slots.DEFAULT_MAX_SLOTS if opts.scan_slots == "on" else 0
    scan_step.FLASH = opts.scan_attention != "matmul"
    scan_step.FUSED_KERNEL = "cudnn" if opts.scan_attention == "cudnn" else "flash"
    fast_scan.MERGED_FIRST_STEP = opts.scan_first_step == "merged"
    rope.FUSED = mlp.FUSED = not opts.eager_ops
    if opts.fused_op_shapes == "dynamic":
        compile_limits.STATIC_SHAPES = 0
    setting = {"config": None, "on": True, "off": False}
    micro_chunk_step.RECOMPUTE_FAM_SCAN = setting[opts.recompute_fam_scan]
    micro_chunk_step.OVERLAP_FAM_SCAN = setting[opts.fam_scan_overlap]


def idle_ms(r: dict) -> float:
    """A profiled row's idle time a step: the gaps between its kernels (benchmarks/profiling.py idle_gaps),
    or, for rows without them, the unprofiled step's wall time less the kernel time. The second is not
    idle time: where kernels overlap it is below the gaps, negative for bswa-1b at 8k (session 22: -2.5
    ms against 9.2 ms of gaps), and session 21 read fam-1b's 19 ms against that as idle the other lacked."""
    gaps = r.get("gaps")
    return gaps["ms"] if gaps else r["kernel_ms"] * (1 / r["gpu_busy"] - 1)


def print_table(rows: list, opts) -> None:
    """The rows as a markdown table, each with its ratio to the bswa config of the same sequence. With
    --profile also the GPU's view of a step: its kernel time, the time the GPU idles between kernels
    (`idle_ms`) and the kernel-time ratio to bswa, which is what the
    tokens/s ratio would be if both kept the GPU equally busy (issue 13, session 16)."""
    print(f"\n{torch.cuda.get_device_name()}, {opts.precision}, vocab {opts.vocab_size}")  # micro-batch: per row
    extra = " GPU busy | kernel ms | idle ms | x bswa, kernels | kernels/step | CPU ms/step | waits |"
    print("| config | sequence | micro-batch | tokens/s | x bswa | model TFLOP/s | MFU | peak memory | recompute |"
          + extra * opts.profile)
    print("|---|---|---|---|---|---|---|---|---|" + "---|---|---|---|---|---|---|" * opts.profile)
    # a row's bswa partner: the same length, micro-batch and recompute (one length may run at several micro-batches)
    cell = lambda name, seq, r: (name, seq, r.get("micro_batch", 1), r["recompute"])  # noqa: E731
    found = {cell(name, seq, r): r for name, seq, r in rows if not r.get("oom")}
    for name, seq, r in rows:
        if r.get("oom"):
            print(f"| {name} | {seq:,} | {r.get('micro_batch', 1)} | out of memory | | | | | {r['recompute']} |"
                  + " | | | | | | |" * opts.profile)
            continue
        bswa = found.get(cell(name.replace("fam", "bswa").replace("dense", "bswa"), seq, r))
        ratio = f"{r['tokens_per_s'] / bswa['tokens_per_s']:.2f}" if bswa else ""
        line = (f"| {name} | {seq:,} | {r.get('micro_batch', 1)} | {r['tokens_per_s'] / 1e3:.1f}k | {ratio} "
                f"| {r['tflops']:.0f} | {r['mfu']:.0%} | {r['peak_gib']:.1f} GiB | {r['recompute']} |")
        if opts.profile:
            kernels = f"{bswa['kernel_ms'] / r['kernel_ms']:.3f}" if bswa else ""
            line += (f" {r['gpu_busy']:.0%} | {r['kernel_ms']:.1f} | {idle_ms(r):.1f} |"
                     f" {kernels} | {r['kernels_per_step']:,.0f} | {r['host_ms']:.0f} |"
                     f" {sum(n for _, n in r['syncs']):.0f} |")
        print(line)
    for name, seq, r in rows if opts.profile else ():
        print_gaps(name, seq, r.get("gaps"), r.get("allocator"))


def print_gaps(name: str, seq: int, gaps: dict | None, allocator: dict | None = None) -> None:
    """Where a profiled row's GPU idled between kernels (benchmarks/profiling.py idle_gaps): by gap size,
    the copies' time, the caching allocator's calls that can idle it, and the three kernel pairs with the
    most idle time between them."""
    if not gaps:
        return
    sizes = ", ".join(f"{size} {ms:.1f}" for size, ms in gaps["by_size"].items())
    calls = ", ".join(f"{n:g} {name}" for name, n in (allocator or {}).items())
    print(f"{name} {seq:,}: idle {gaps['ms']:.1f} ms a step in {gaps['count']:,.0f} gaps (ms by gap: {sizes});"
          f" copies and memsets {gaps['copy_ms']:.1f} ms" + (f"; allocator a step: {calls}" if calls else ""))
    for before, after, count, ms in gaps["pairs"][:3]:
        print(f"  {ms:.2f} ms in {count:,.0f} gaps: {before} -> {after}")


def add_anchor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=["bf16-mixed", "bf16-autocast"], default="bf16-mixed",
                        help="the step's precision (train.precision; pipeline/training/precision.py)")
    parser.add_argument("--anchor", nargs="?", const=DEFAULT_ANCHOR, default=None, metavar="PATH",
                        help=f"also run the shared plain-PyTorch anchor at each row's shape and attention (default "
                             f"path {DEFAULT_ANCHOR}) and print each row's ratio to it")
    parser.add_argument("--results-dir", default="benchmarks/results",
                        help="the rows go to <this>/<date>-<card>/train_step.json")


def anchor_record(anchor, anchors: dict, opts, name: str, seq: int, result: dict) -> dict:
    """The row's JSON record, with the anchor's row of the same attention, sequence and recompute
    (run once per such key: fam and bswa rows share their BSWA anchor)."""
    row = None
    if anchor is not None and not result.get("oom"):
        args = load_model_args(name, vocab_size=opts.vocab_size)
        key = (args.attention == "dense", seq, result["recompute"])
        if key not in anchors:
            anchors[key] = run_anchor(anchor, args, seq, result["recompute"], max(3, opts.steps), opts.profile)
            print("  anchor", {k: v for k, v in anchors[key].items() if k not in ("kernels", "ops")}, flush=True)
        row = anchors[key]
    return to_record(name, seq, opts.precision, {k: v for k, v in result.items() if k != "kernels"}, row)


def _anchor_part(record: dict) -> dict:
    """The anchor's row (its kernel and operator lists left out) and the ratio to it, if the row has one."""
    if "anchor" not in record:
        return {}
    return {"anchor": {k: v for k, v in record["anchor"].items() if k not in ("kernels", "ops")},
            "x_anchor": record["x_anchor"]}


def print_anchor_ratios(records: list[dict]) -> None:
    if not any("anchor" in r for r in records):
        return
    print("| config | sequence | tokens/s | anchor attention | anchor tokens/s | x anchor | anchor MFU | anchor peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        a = r.get("anchor")
        if a is None or a.get("oom") or not r["tokens_per_s"]:
            state = "out of memory" if a and a.get("oom") else "n/a"
            print(f"| {r['config']} | {r['seq_len']:,} | {(r['tokens_per_s'] or 0) / 1e3:.1f}k | {state} | | | | |")
            continue
        mfu = f"{a['mfu']:.0%}" if a["mfu"] else "n/a"
        print(f"| {r['config']} | {r['seq_len']:,} | {r['tokens_per_s'] / 1e3:.1f}k | {a['attention']} | "
              f"{a['tokens_per_s'] / 1e3:.1f}k | {r['x_anchor']:.2f} | {mfu} | {a['peak_gib']:.1f} GiB |")


if __name__ == "__main__":
    main()
