"""Parallel layouts against one GPU: loss curve, tokens/s, peak memory and the estimator.

    torchrun --nproc_per_node 2 -m benchmarks.parallel_parity --tp 2 --out tp2.json
    torchrun --nproc_per_node 4 -m benchmarks.parallel_parity --tp 2 --pp 2 --out tp2pp2.json
    torchrun --nproc_per_node 2 -m benchmarks.parallel_parity --zero 2 --out zero2.json
    torchrun --nproc_per_node 2 -m benchmarks.parallel_parity --out dp2.json     # plain DP: gradients averaged

One cell per command; `benchmarks/parity_suite.py` runs every layout on one machine and prints
the comparison table.

Every layout starts from the same weights (drawn per parameter name, model/init.py) and
reads the same batches: consecutive windows of the running Python's standard library source as
bytes, so the loss falls. Global batch `--global-batch` sequences per step: accumulated micro-
batches of one sequence on one GPU, pipeline micro-batches under PP, split over DP ranks under
ZeRO. bf16 autocast with fp32 weights everywhere (DeepSpeed in fp32 mode with ZeRO, the model
under autocast), no clipping, no RPO/RSP: the curves may differ by bf16 rounding only.
Per step it records the loss, the global gradient norm before the update (TP-, PP- and DP-aware:
pipeline/training/optim.py global_norm; DeepSpeed's own under ZeRO) and a weight checksum, the
global L2 norm of the weights after the update. AdamW is blind to a gradient's scale, so a
data-parallel gradient summed instead of averaged leaves the loss curve as it is; the gradient
norm shows it (x DP). Plain DP (no --zero) averages the gradients with the training's own
reduction, pipeline/parallel/collectives.py average_gradients.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig
import time

import numpy as np
import torch
import torch.distributed as dist


def stdlib_windows(seq_len: int, count: int) -> torch.Tensor:
    """`count` consecutive byte windows of seq_len + 1 from the stdlib sources (sorted files)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    data = np.frombuffer(b"".join(open(f, "rb").read() for f in files), dtype=np.uint8)
    need = count * (seq_len + 1)
    if data.size < need:
        data = np.tile(data, need // data.size + 1)
    return torch.from_numpy(data[:need].astype(np.int64)).view(count, seq_len + 1)


def build_cell(opts, groups, args, per_rank: int) -> dict:
    """The layout's model (or this rank's stages and schedule), optimizer and ZeRO engine, from
    the same initial weights in every layout (drawn per parameter name, model/init.py)."""
    from model import build_model
    from pipeline.parallel.stages import build_schedule, build_stages

    cuda, device = torch.cuda.is_available(), groups.device
    cell = {"engine": None, "stages": None, "groups": groups}
    if opts.pp > 1:
        cell["stages"] = build_stages(args, groups.pp_rank, opts.pp, device=device, seed=opts.seed, tp_group=groups.tp_group)
        params = [p for _, s in cell["stages"] for p in s.parameters()]
        cell["schedule"] = build_schedule(cell["stages"], opts.pp, per_rank, "1f1b", groups.pp_group, device)
    else:
        cell["model"] = build_model(args, device=device, seed=opts.seed, tp_group=groups.tp_group)
        params = list(cell["model"].parameters())
    cell["params"] = params
    if opts.eager_scan:  # the CPU's per-step autograd scan on GPU too: tells the fast scan's share of a difference
        parts = [s.part for _, s in cell["stages"]] if cell["stages"] else [cell["model"]]
        for layer in (layer for part in parts for layer in part.layers):
            layer.use_fast_scan = False
    cell["optimizer"] = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=cuda)
    if opts.zero:
        from pipeline.config.load import load_config
        from pipeline.parallel.mpu import MegatronMPU
        from pipeline.parallel.zero import ZeroModule, build_zero_engine
        from pipeline.parallel.zero_config import to_deepspeed_config

        # DeepSpeed turns an outer autocast off inside its engine; its own `torch_autocast` keeps
        # the model under bf16 autocast like the other cells (fp32 gradients reduced: no modules
        # named for lower-precision communication).
        autocast = {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
        cfg = load_config(None, [f"--parallel.zero_stage={opts.zero}", "--data.micro_batch_size=1",
                                 f"--data.global_batch_size={per_rank * groups.dp_size}", "--optim.grad_clip=0"])
        cfg.parallel.deepspeed_overrides = autocast if cuda else None
        ds = to_deepspeed_config(cfg, groups.dp_size, bf16=False)
        cell["engine"] = build_zero_engine(ZeroModule(cell["model"]), cell["optimizer"], ds, MegatronMPU.from_groups(groups))
    return cell


def cell_step(cell: dict, tokens: torch.Tensor, labels: torch.Tensor, per_rank: int):
    """Forward, backward and optimizer step of one global batch's share: (the loss, None off the last
    stage; the global gradient norm before the update)."""
    from pipeline.parallel import collectives
    from pipeline.parallel.stages import pipeline_step
    from pipeline.parallel.zero import zero_train_step
    from pipeline.training.optim import grad_norm

    cuda, groups = torch.cuda.is_available(), cell["groups"]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        if cell["engine"] is not None:
            micro = [{"tokens": tokens[i : i + 1], "labels": labels[i : i + 1], "return_logits": False} for i in range(per_rank)]
            result = zero_train_step(cell["engine"], micro)
            return result.loss, result.grad_norm
        if cell["stages"] is not None:
            loss = pipeline_step(cell["schedule"], cell["stages"], tokens, labels, torch.zeros(per_rank, device=tokens.device))
        else:
            loss = 0.0
            for i in range(per_rank):
                micro_loss = cell["model"](tokens[i : i + 1], labels=labels[i : i + 1], return_logits=False).loss / per_rank
                micro_loss.backward()
                loss = loss + micro_loss.detach()
    collectives.average_gradients(cell["params"], groups.dp_group)  # looked up per call: a test plants a bug here
    norm = float(grad_norm(cell["params"], groups.tp_group, groups.pp_group))
    cell["optimizer"].step()
    cell["optimizer"].zero_grad(set_to_none=True)
    return loss, norm


def weight_checksum(cell: dict) -> float:
    """Global L2 norm of the weights (TP shards and PP stages together; ZeRO-1/2 keep them whole)."""
    from pipeline.training.optim import global_norm

    groups, params = cell["groups"], cell["params"]
    pairs = [(p.data, getattr(p, "tensor_model_parallel", False)) for p in params]
    return float(global_norm(pairs, groups.device, groups.tp_group, groups.pp_group))


def run(opts) -> dict:
    from model import load_model_args
    from pipeline.parallel.groups import start_groups

    groups = start_groups(opts.tp, opts.pp)  # CPU (gloo, fp32) only to smoke-test this script
    cuda, device, dp = torch.cuda.is_available(), groups.device, groups.dp_size
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    args = load_model_args(opts.config, vocab_size=opts.vocab_size, recompute=opts.recompute)
    data = stdlib_windows(opts.seq_len, opts.steps * opts.global_batch).to(device)
    per_rank = opts.global_batch // dp
    cell = build_cell(opts, groups, args, per_rank)
    losses, times, grad_norms, weight_norms = [], [], [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(opts.steps):
        rows = data[step * opts.global_batch : (step + 1) * opts.global_batch]
        batch = rows[groups.dp_rank * per_rank : (groups.dp_rank + 1) * per_rank]
        for group in cell["optimizer"].param_groups:  # the torch AdamW under DeepSpeed's ZeRO too
            group["lr"] = warmup_lr(opts, step)
        sync()
        start = time.perf_counter()
        loss, norm = cell_step(cell, batch[:, :-1], batch[:, 1:], per_rank)
        # The loss lives on the last pipeline stage; average it over DP for the curve.
        value = torch.zeros(1, device=device) if loss is None else loss.float().reshape(1)
        dist.all_reduce(value)
        value /= opts.tp * dp  # summed over the TP copies and DP ranks that hold a loss
        sync()
        times.append(time.perf_counter() - start)
        losses.append(value.item())
        grad_norms.append(norm)
        weight_norms.append(weight_checksum(cell))
    peak = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0], device=device, dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    steady = times[3:] or times
    return {
        "layout": f"TP{opts.tp} PP{opts.pp} DP{dp}" + (f" ZeRO-{opts.zero}" if opts.zero else ""),
        "tp": opts.tp, "pp": opts.pp, "dp": dp, "zero": opts.zero, "gpus": dist.get_world_size(),
        "config": opts.config, "vocab_size": opts.vocab_size, "seq_len": opts.seq_len, "global_batch": opts.global_batch,
        "lr": opts.lr, "warmup_steps": opts.warmup_steps,
        "losses": losses, "grad_norms": grad_norms, "weight_norms": weight_norms,
        "step_seconds": times, "tokens_per_s": opts.global_batch * opts.seq_len / (sum(steady) / len(steady)),
        "peak_gib": peak.item() / 2**30, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "estimate_gib": estimate_gib(args, opts, dp, per_rank),
    }


def warmup_lr(opts, step: int) -> float:
    """Linear warm-up over --warmup-steps (0: the constant --lr), as pretraining recipes do. Without
    it AdamW's first updates move every weight by about lr whatever its gradient, the loss jumps
    at step 3 (fam-1b at 8k: 8.0 -> 11.9 at lr 3e-4, 7.7 -> 11.0 at 1e-4) and the layouts' bf16
    rounding differences grow ~10x a step from there on (benchmarks/results/2026-11-30-2xH200)."""
    return opts.lr * min(1.0, (step + 1) / opts.warmup_steps) if opts.warmup_steps else opts.lr


def estimate_gib(args, opts, dp: int, per_rank: int) -> float:
    from pipeline.memory.estimate import Settings, estimate

    est = estimate(args, Settings(tp=opts.tp, pp=opts.pp, dp=dp, zero=opts.zero, micro_batch=1, seq_len=opts.seq_len,
                                  recompute=opts.recompute, microbatches=per_rank, precision="autocast"))
    return max(r.peak for r in est.ranks) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fam-1b")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up over this many steps")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--eager-scan", action="store_true",
                        help="the per-step autograd FAM scan (model/scan.py) on GPU too, not model/fast_scan.py")
    parser.add_argument("--out")
    opts = parser.parse_args()
    if opts.warmup_steps < 0:
        parser.error(f"--warmup-steps {opts.warmup_steps}: must be 0 (no warm-up) or a number of steps")
    result = run(opts)
    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "grad_norms", "weight_norms")}),
              flush=True)
        for key in ("losses", "grad_norms", "weight_norms"):
            print(key, " ".join(f"{x:.6g}" for x in result[key]), flush=True)
        if opts.out:
            json.dump(result, open(opts.out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
