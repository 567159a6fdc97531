"""The scan's attention backward two ways, for one layer: a GPU probe for issue 13 (before building it).

    python -m benchmarks.step_attention_probe --config fam-1b --seq-lens 8192 65536 --micro-batch 1 4

Each backward step of the fast scan (model/scan_step.py `step_backward`) back-propagates the FAM rows'
attention over [F_{t-1}; block t] (F + C keys). Today that is flash attention's backward: dQ, and dK, dV
for all F + C keys; then a copy of the block rows' dK, dV into the scan's gradient buffers [T, C, b, g, d]
(session 22's trace at fam-1b 8k, micro-batch 4: 41 us and 22 us a step, of a backward step's ~198 us).
Only dQ and the FAM rows' dK, dV feed the recurrence; the block rows' dK, dV are an output. So:
  flash     today: per step, flash's backward, then the block rows copied out;
  deferred  per step, dQ and the FAM rows' dK, dV only, from matrix products with flash's kept
            log-sum-exp (no softmax recomputed from scratch); after the loop, every block's rows' dK,
            dV at once, batched over the T blocks, written in the buffers' layout.
This probe times both for one layer's T blocks (every block whole: T = S / C rounded up), each as one
CUDA graph (as the scan replays its loop), and checks on the way that they agree. It bounds what
building `deferred` into the scan could gain. tests/test_step_attention_probe.py checks the math of
`deferred` against the full backward.
"""

from __future__ import annotations

import math

import torch

from benchmarks import probe_cli
from model.config import ModelArgs
from model.scan_step import _attend_backward, _flash, _flash_backward

VARIANTS = ("flash", "deferred")


def _scores_backward(d_ctx, q, kh, vh, ctx, lse, scale: float):
    """(p, ds) [..., rows, keys] fp32 of softmax(q k^T scale) v over the keys kh, vh given (all of them or
    some): p from the whole softmax's log-sum-exp lse, ds = p (dp - D) with D = rowsum(d_ctx * ctx)."""
    p = torch.exp(torch.matmul(q.float(), kh.float().transpose(-1, -2)) * scale - lse[..., None])
    dp = torch.matmul(d_ctx.float(), vh.float().transpose(-1, -2))
    return p, p * (dp - (d_ctx.float() * ctx.float()).sum(-1, keepdim=True))


def rows_backward(d_ctx, q, kh, vh, ctx, lse, n_f: int, scale: float):
    """dQ [b, g, rows, d] fp32 over all keys, and the FAM rows' dK, dV [b, g, F, d] fp32, of softmax(q k^T
    scale) v at (q, kh [b, g, F + c, d], vh), given its output ctx and log-sum-exp lse [b, g, rows]."""
    p, ds = _scores_backward(d_ctx, q, kh, vh, ctx, lse, scale)
    dq = torch.matmul(ds, kh.float()) * scale
    d_k = torch.matmul(ds[..., :n_f].transpose(-1, -2), q.float()) * scale
    d_v = torch.matmul(p[..., :n_f].transpose(-1, -2), d_ctx.float())
    return dq, d_k, d_v


def block_rows_backward(d_ctx, q, keys, values, ctx, lse, n_f: int, scale: float):
    """Every block's rows' dK, dV [T, C, b, g, d] (the scan's gradient buffers' layout) at once: d_ctx,
    q, ctx [T, b, g, rows, d], lse [T, b, g, rows], keys and values [T, F + C, b, g, d] (the scan's
    buffers)."""
    kh, vh = (x[:, n_f:].permute(0, 2, 3, 1, 4) for x in (keys, values))  # [T, b, g, C, d]
    p, ds = _scores_backward(d_ctx, q, kh, vh, ctx, lse, scale)
    d_k = torch.matmul(ds.transpose(-1, -2), q.float()) * scale  # [T, b, g, C, d]
    d_v = torch.matmul(p.transpose(-1, -2), d_ctx.float())
    return tuple(x.permute(0, 3, 1, 2, 4).to(keys.dtype) for x in (d_k, d_v))


class Layer:
    """One layer's T blocks of scan attention at a config's shapes: the keys/values buffers [T, F + C, b,
    g, d], each step's FAM queries, output, log-sum-exp and output gradient, and the outputs both
    variants write (the block rows' dK, dV [T, C, b, g, d]; dQ and the FAM rows' dK, dV per step)."""

    def __init__(self, args: ModelArgs, seq: int, micro_batch: int, device, dtype):
        T, F, C, b = math.ceil(seq / args.block_size), args.fam_len, args.block_size, micro_batch
        g, d = args.query_groups, args.head_dim
        rows = args.num_attention_heads // g * F
        self.n_f, self.scale, self.T = F, d**-0.5, T
        make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
        self.keys, self.values = make(T, F + C, b, g, d), make(T, F + C, b, g, d)
        # the output and its gradient [T, b, g, rows, d] laid out as flash lays out its output, [b, rows, g, d]
        # per block, as the scan keeps them (model/scan_step.py `_as_flash_output`): any other costs copies
        flash_layout = lambda: torch.empty(T, b, rows, g, d, device=device, dtype=dtype).transpose(2, 3)  # noqa: E731
        self.q, self.d_ctx = make(T, b, g, rows, d), flash_layout().copy_(make(T, b, g, rows, d) * 0.1)
        heads = lambda x: x.permute(1, 2, 0, 3)  # noqa: E731 - [F + C, b, g, d] -> [b, g, F + C, d]
        self.ctx, self.lse = flash_layout(), torch.empty(T, b, g, rows, device=device)
        for t in range(T):
            ctx, lse = self._forward(self.q[t], heads(self.keys[t]), heads(self.values[t]))
            self.ctx[t].copy_(ctx)
            self.lse[t].copy_(lse)
        self.d_keys, self.d_values = make(T, C, b, g, d), make(T, C, b, g, d)
        self.dq = torch.empty(T, b, g, rows, d, device=device)
        self.d_fam_k, self.d_fam_v = (torch.empty(T, b, g, F, d, device=device) for _ in range(2))
        self.heads = heads

    def _uses_flash(self) -> bool:
        return self.q.is_cuda and self.q.dtype != torch.float32

    def _forward(self, q, kh, vh):
        if self._uses_flash():
            return _flash(q, kh, vh, q.shape[-1])
        s = torch.matmul(q, kh.transpose(-1, -2)) * self.scale
        return torch.matmul(torch.softmax(s, dim=-1), vh), torch.logsumexp(s, dim=-1)

    def flash(self) -> None:
        """Today's steps (model/scan_step.py): flash's backward (on CPU and in fp32 the full backward of
        the matrix products, as the scan runs there), the block rows copied out."""
        F, d = self.n_f, self.q.shape[-1]
        for t in reversed(range(self.T)):
            kh, vh = self.heads(self.keys[t]), self.heads(self.values[t])
            if self._uses_flash():
                dq, d_k, d_v = _flash_backward(self.d_ctx[t], self.q[t], kh, vh, self.ctx[t], self.lse[t], d)
            else:
                p = torch.softmax(torch.matmul(self.q[t], kh.transpose(-1, -2)) * self.scale, dim=-1)
                dq, d_k, d_v = _attend_backward(self.d_ctx[t], p, self.q[t], kh, vh, d)
            self.dq[t].copy_(dq)
            self.d_fam_k[t].copy_(d_k[:, :, :F])
            self.d_fam_v[t].copy_(d_v[:, :, :F])
            self.d_keys[t].copy_(d_k[:, :, F:].permute(2, 0, 1, 3))
            self.d_values[t].copy_(d_v[:, :, F:].permute(2, 0, 1, 3))

    def deferred(self, step=rows_backward, blocks=block_rows_backward) -> None:
        """dQ and the FAM rows' dK, dV per step; every block's rows after the loop."""
        for t in reversed(range(self.T)):
            kh, vh = self.heads(self.keys[t]), self.heads(self.values[t])
            dq, d_k, d_v = step(self.d_ctx[t], self.q[t], kh, vh, self.ctx[t], self.lse[t], self.n_f, self.scale)
            self.dq[t].copy_(dq)
            self.d_fam_k[t].copy_(d_k)
            self.d_fam_v[t].copy_(d_v)
        d_k, d_v = blocks(self.d_ctx, self.q, self.keys, self.values, self.ctx, self.lse, self.n_f, self.scale)
        self.d_keys.copy_(d_k)
        self.d_values.copy_(d_v)

    def results(self) -> dict:
        names = ("dq", "d_fam_k", "d_fam_v", "d_keys", "d_values")
        return {name: getattr(self, name).float().clone() for name in names}


def probe(args: ModelArgs, seq: int, micro_batch: int, device: str, warmup: int, iters: int) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = Layer(args, seq, micro_batch, device, dtype)
    compile_ = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if device == "cuda" else (lambda f: f)
    step, blocks = compile_(rows_backward), compile_(block_rows_backward)
    runs = {"flash": layer.flash, "deferred": lambda: layer.deferred(step, blocks)}
    row, results = {"seq_len": seq, "micro_batch": micro_batch, "blocks": layer.T}, {}
    for name in VARIANTS:
        row[name] = {"us_per_layer": probe_cli.graph_seconds(runs[name], device, warmup, iters) * 1e6}
        runs[name]()
        results[name] = layer.results()
    # the two must agree (bf16 on a GPU: flash's own rounding), else a time means nothing
    row["max_rel_diff"] = max((results["deferred"][n] - x).abs().max().item() / x.abs().max().item()
                              for n, x in results["flash"].items())
    return row


def print_table(name: str, rows: list[dict], device: str) -> None:
    print(f"\n{name}: one layer's scan attention backward, T blocks ({device})")
    print("| sequence | micro-batch | blocks | flash us | deferred us | flash / deferred | us saved a step "
          "| max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, d = r["flash"]["us_per_layer"], r["deferred"]["us_per_layer"]
        print(f"| {r['seq_len']:,} | {r['micro_batch']} | {r['blocks']} | {f:.1f} | {d:.1f} | {f / d:.2f} "
              f"| {(f - d) / r['blocks']:.1f} | {r['max_rel_diff']:.1e} |")


def main(argv: list[str] | None = None) -> list[dict]:
    return probe_cli.main(argv, __doc__.split("\n")[0], "step_attention_probe", probe, print_table,
                          seq_lens=[8192, 65536], micro_batch=[1, 4], warmup=3, iters=20)


if __name__ == "__main__":
    main()
