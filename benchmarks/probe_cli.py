"""The command line the one-layer GPU probes share (benchmarks/block_rows_probe.py,
benchmarks/step_attention_probe.py, benchmarks/step_backends_probe.py): a FAM config, sequence lengths
and micro-batches, the device, and the rows, printed and saved as each cell finishes."""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from benchmarks.micro_chunk_step import save_rows
from model import load_model_args
from model.config import ModelArgs


def probe_parser(description: str, seq_lens: list[int], micro_batch: list[int], warmup: int,
                 iters: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="fam-1b", help="a FAM config: its layer's shapes, C and F")
    parser.add_argument("--seq-lens", nargs="+", type=int, default=seq_lens)
    parser.add_argument("--micro-batch", nargs="+", type=int, default=micro_batch)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu runs the same work (tests, tiny configs); only a GPU's times mean anything")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--json", help="also write the rows to this file, after each one")
    return parser


def fam_config(parser: argparse.ArgumentParser, opts, name: str) -> ModelArgs:
    """The named FAM config; an unknown or FAM-less one, or a missing GPU, is an error that says so."""
    try:
        args = load_model_args(opts.config)
    except ValueError as err:  # an unknown name, a YAML file that does not parse, a bad value: named in err
        parser.error(f"--config {opts.config}: {err}")
    if not args.uses_fam:
        parser.error(f"--config {opts.config}: no FAM rows (attention '{args.attention}', fam_len {args.fam_len}); "
                     "name a FAM config such as fam-1b")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"benchmarks.{name} times GPU kernels: no CUDA device here (--device cpu to try it)")
    return args


def run_cells(probe: Callable[..., dict], args: ModelArgs, opts) -> list[dict]:
    """probe(args, seq, micro_batch, device, warmup, iters) for every cell; each row printed, and saved
    (--json) as it comes: a run cut short keeps what it measured."""
    rows = []
    for seq in opts.seq_lens:
        for b in opts.micro_batch:
            rows.append(probe(args, seq, b, opts.device, opts.warmup, opts.iters))
            print(rows[-1], flush=True)
            if opts.json:
                save_rows(rows, opts.json)
    return rows


def device_name(opts) -> str:
    return torch.cuda.get_device_name() if opts.device == "cuda" else "cpu"


def main(argv: list[str] | None, description: str, name: str, probe: Callable[..., dict],
         print_table: Callable[[str, list[dict], str], None], **defaults) -> list[dict]:
    """A probe's whole command: parse (`defaults`: seq_lens, micro_batch, warmup, iters), check the config,
    run every cell, print the table; the rows."""
    parser = probe_parser(description, **defaults)
    opts = parser.parse_args(argv)
    rows = run_cells(probe, fam_config(parser, opts, name), opts)
    print_table(opts.config, rows, device_name(opts))
    return rows


def cuda_seconds(run: Callable[[], object], iters: int) -> float:
    """Seconds per call of run() on the GPU, between CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def wall_seconds(run: Callable[[], object], iters: int) -> float:
    """Seconds per call of run() on the wall clock (CPU: tests, tiny configs)."""
    began = time.perf_counter()
    for _ in range(iters):
        run()
    return (time.perf_counter() - began) / iters


def graph_seconds(run: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Seconds per run() after `warmup` runs: on a GPU one CUDA graph of it, replayed (the scan replays its
    loops so), else the wall clock."""
    for _ in range(warmup):
        run()
    if device != "cuda":
        return wall_seconds(run, iters)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    return cuda_seconds(graph.replay, iters)
