"""Training-step speed and memory of FAM, BSWA and dense models, in one run, on one GPU.

    python -m benchmarks.train_step --configs fam-1b bswa-1b dense-1b --seq-lens 8192 32768 65536

Each cell: forward + backward + AdamW step in bf16 autocast (fp32 master weights, fused AdamW),
micro-batch 1, after warm-up steps (which also absorb torch.compile of FlexAttention). Prints
tokens/s, model TFLOP/s (FLOPs counted for windowed attention + FAM tokens, pipeline/flops.py)
and peak memory. The vocabulary defaults to 32k (the paper's 256k logits do not fit a 65k
sequence on one GPU without a chunked loss); say so when quoting the numbers.
`--recompute auto` recomputes activations at 64k and beyond, and wherever a cell would not fit without it.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from model import build_model, init_parallel, load_model_args
from pipeline.flops import flops_per_token, peak_flops


def run_cell(name: str, seq: int, vocab: int, recompute: bool, warmup: int, steps: int) -> dict:
    args = load_model_args(name, vocab_size=vocab, recompute=recompute)
    model = build_model(args, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, vocab, (1, seq + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
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
    flops = flops_per_token(args, seq)
    return {
        "tokens_per_s": seq / seconds,
        "tflops": seq * flops / seconds / 1e12,
        "mfu": seq * flops / seconds / (peak_flops(torch.device("cuda")) or float("nan")),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": loss.item(),
        "recompute": recompute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["fam-1b", "bswa-1b", "dense-1b"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 32768, 65536])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--recompute", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.train_step measures GPU speed: no CUDA device here")
    init_parallel()
    rows = []
    for seq in opts.seq_lens:
        for name in opts.configs:
            auto = [True] if seq >= 65536 else [False, True]  # 64k+ never fits a 1B model without it
            tries = {"auto": auto, "on": [True], "off": [False]}[opts.recompute]
            for recompute in tries:
                try:
                    result = run_cell(name, seq, opts.vocab_size, recompute, opts.warmup, opts.steps)
                    break
                except torch.OutOfMemoryError:
                    result = {"oom": True, "recompute": recompute}
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
            rows.append((name, seq, result))
            print(name, seq, result, flush=True)

    print(f"\n{torch.cuda.get_device_name()}, bf16, micro-batch 1, vocab {opts.vocab_size}")
    print("| config | sequence | tokens/s | model TFLOP/s | MFU | peak memory | recompute |")
    print("|---|---|---|---|---|---|---|")
    for name, seq, r in rows:
        if r.get("oom"):
            print(f"| {name} | {seq:,} | out of memory | | | | {r['recompute']} |")
        else:
            print(
                f"| {name} | {seq:,} | {r['tokens_per_s'] / 1e3:.1f}k | {r['tflops']:.0f} | {r['mfu']:.0%} "
                f"| {r['peak_gib']:.1f} GiB | {r['recompute']} |"
            )


if __name__ == "__main__":
    main()
