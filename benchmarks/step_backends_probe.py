"""The scan step's attention by SDPA kernel, forward and backward, for one layer: a GPU probe (issue 13).

    python -m benchmarks.step_backends_probe --config fam-1b --seq-lens 8192 --micro-batch 4 6

Each fast-scan step attends its F FAM queries over [F_{t-1}; block t] (F + C keys) with flash attention
(model/scan_step.py `_flash`, `_flash_backward`). At fam-1b's shapes that is a small problem (64 query rows
per head), bound by latency more than by work: session 22's trace at 8k, micro-batch 4, spent 10 ms a
step in it over 306 steps. This times the same attention, forward then backward, through
`scaled_dot_product_attention` restricted to one kernel each (flash, cuDNN, memory-efficient), for one
layer's T blocks as one CUDA graph (as the scan replays its loops), with the scan's layouts: queries
[b, g, rows, d] contiguous, keys and values seen through [F + C, b, g, d] buffers. A kernel that does not
take these inputs is reported as such. Each backend's output and gradients are checked against flash's
(bf16 rounding), so a time is never that of a wrong result. On CPU the `math` kernel runs (tests).
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import probe_cli
from model.config import ModelArgs

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def blocks(args: ModelArgs, seq: int, micro_batch: int, device, dtype) -> dict:
    """One layer's T blocks at a config's shapes: FAM queries [T, b, g, rows, d], keys and values
    [T, F + C, b, g, d], the output gradient [T, b, g, rows, d]."""
    T, F, C, b = math.ceil(seq / args.block_size), args.fam_len, args.block_size, micro_batch
    g, d, rows = args.query_groups, args.head_dim, args.num_attention_heads // args.query_groups * args.fam_len
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    return dict(q=make(T, b, g, rows, d), keys=make(T, F + C, b, g, d), values=make(T, F + C, b, g, d),
                d_out=make(T, b, g, rows, d) * 0.1)


def layer_run(backend: SDPBackend, x: dict):
    """A closure running every block's attention forward and backward, writing out, dq, dk, dv."""
    T = x["q"].shape[0]
    out = {name: torch.empty_like(x[src]) for name, src in (("out", "q"), ("dq", "q"), ("dk", "keys"),
                                                            ("dv", "values"))}

    def run():
        with sdpa_kernel([backend]):
            for t in range(T):
                q = x["q"][t].detach().requires_grad_()
                kh, vh = (x[n][t].permute(1, 2, 0, 3).detach().requires_grad_() for n in ("keys", "values"))
                o = torch.nn.functional.scaled_dot_product_attention(q, kh, vh)
                dq, dk, dv = torch.autograd.grad(o, (q, kh, vh), x["d_out"][t])
                out["out"][t].copy_(o.detach())
                out["dq"][t].copy_(dq)
                out["dk"][t].copy_(dk.permute(2, 0, 1, 3))
                out["dv"][t].copy_(dv.permute(2, 0, 1, 3))
    return run, out


def probe(args: ModelArgs, seq: int, micro_batch: int, device: str, warmup: int, iters: int,
          backends: tuple = ()) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    names = backends or (("flash", "cudnn", "efficient") if device == "cuda" else ("math",))
    x = blocks(args, seq, micro_batch, device, dtype)
    row, first = {"seq_len": seq, "micro_batch": micro_batch, "blocks": x["q"].shape[0]}, None
    for name in names:
        run, out = layer_run(BACKENDS[name], x)
        try:
            seconds = probe_cli.graph_seconds(run, device, warmup, iters)
        except RuntimeError as err:  # this kernel does not take these inputs (layout, size, card)
            row[name] = {"error": str(err).splitlines()[0][:200]}
            continue
        run()
        first = first or out
        diff = max((out[n].float() - first[n].float()).abs().max().item() / first[n].float().abs().max().item()
                   for n in out)
        row[name] = {"us_per_layer": seconds * 1e6, "us_per_step": seconds * 1e6 / row["blocks"],
                     "max_rel_diff": diff}
    return row


def print_table(name: str, rows: list[dict], device: str) -> None:
    print(f"\n{name}: one layer's scan attention, forward and backward, by kernel, us a step ({device})")
    names = [n for n in BACKENDS if any(n in r for r in rows)]
    print("| sequence | micro-batch | blocks | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [("-" if n not in r else f"{r[n]['us_per_step']:.1f} ({r[n]['max_rel_diff']:.0e})"
                  if "us_per_step" in r[n] else "unsupported") for n in names]
        print(f"| {r['seq_len']:,} | {r['micro_batch']} | {r['blocks']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> list[dict]:
    return probe_cli.main(argv, __doc__.split("\n")[0], "step_backends_probe", probe, print_table,
                          seq_lens=[8192, 65536], micro_batch=[1, 4], warmup=3, iters=20)


if __name__ == "__main__":
    main()
