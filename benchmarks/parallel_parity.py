"""Parallel layouts against one GPU: loss curve, tokens/s, peak memory and the estimator.

    torchrun --nproc_per_node 2 -m benchmarks.parallel_parity --tp 2 --out tp2.json
    torchrun --nproc_per_node 4 -m benchmarks.parallel_parity --tp 2 --pp 2 --out tp2pp2.json
    torchrun --nproc_per_node 2 -m benchmarks.parallel_parity --zero 2 --out zero2.json

One cell per command; `benchmarks/parity_suite.py` runs every layout on one machine and prints
the comparison table.

Every layout starts from the same weights (drawn per parameter name, model/init.py) and
reads the same batches: consecutive windows of the running Python's standard library source as
bytes, so the loss falls. Global batch `--global-batch` sequences per step: accumulated micro-
batches of one sequence on one GPU, pipeline micro-batches under PP, split over DP ranks under
ZeRO. bf16 autocast with fp32 weights everywhere (DeepSpeed in fp32 mode with ZeRO, the model
under autocast), no clipping, no RPO/RSP: the curves may differ by bf16 rounding only.
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


def run(opts) -> dict:
    from megatron.core import parallel_state as ps

    from model import build_model, init_parallel, load_model_args
    from pipeline.pipeline_parallel import build_initialised_stages, build_schedule, pipeline_step

    init_parallel(opts.tp, opts.pp)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cuda = torch.cuda.is_available()  # CPU (gloo, fp32) only to smoke-test this script
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if dp > 1 and not opts.zero:
        raise SystemExit(f"data parallel (DP={dp}) is measured with ZeRO here: pass --zero 1|2|3")
    args = load_model_args(opts.config, vocab_size=opts.vocab_size, recompute=opts.recompute)
    data = stdlib_windows(opts.seq_len, opts.steps * opts.global_batch).to(device)
    per_rank = opts.global_batch // dp

    # The same initial weights in every layout: drawn per parameter name (model/init.py).
    if opts.pp > 1:
        stages = build_initialised_stages(args, pp_rank, opts.pp, opts.seed, device, tp_rank, opts.tp)
        params = [p for _, s in stages for p in s.parameters()]
        schedule = build_schedule(stages, opts.pp, per_rank, "1f1b", ps.get_pipeline_model_parallel_group(), device)
    else:
        model = build_model(args, device=device, seed=opts.seed)
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=cuda)
    engine = None
    if opts.zero:
        from pipeline.zero import ZeroModule, build_zero_engine, to_deepspeed_config, zero_train_step

        # DeepSpeed turns an outer autocast off inside its engine; its own `torch_autocast` keeps
        # the model under bf16 autocast like the other cells (fp32 gradients reduced: no modules
        # named for lower-precision communication).
        autocast = {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
        ds = to_deepspeed_config(opts.zero, 1, per_rank, 0.0, False, False, dp, autocast if cuda else None)
        engine = build_zero_engine(ZeroModule(model), optimizer, ds)

    losses, times = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(opts.steps):
        batch = data[step * opts.global_batch : (step + 1) * opts.global_batch][dp_rank * per_rank : (dp_rank + 1) * per_rank]
        tokens, labels = batch[:, :-1], batch[:, 1:]
        sync()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if engine is not None:
                micro = [{"tokens": tokens[i : i + 1], "labels": labels[i : i + 1], "return_logits": False} for i in range(per_rank)]
                loss = zero_train_step(engine, micro).loss
            elif opts.pp > 1:
                loss = pipeline_step(schedule, stages, tokens, labels, torch.zeros(per_rank, device=device))
            else:
                loss = 0.0
                for i in range(per_rank):
                    micro_loss = model(tokens[i : i + 1], labels=labels[i : i + 1], return_logits=False).loss / per_rank
                    micro_loss.backward()
                    loss = loss + micro_loss.detach()
        if engine is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # The loss lives on the last pipeline stage; average it over DP for the curve.
        value = torch.zeros(1, device=device) if loss is None else loss.float().reshape(1)
        dist.all_reduce(value)
        value /= opts.tp * dp  # summed over the TP copies and DP ranks that hold a loss
        sync()
        times.append(time.perf_counter() - start)
        losses.append(value.item())
    peak = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0], device=device, dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    steady = times[3:] or times
    return {
        "layout": f"TP{opts.tp} PP{opts.pp} DP{dp}" + (f" ZeRO-{opts.zero}" if opts.zero else ""),
        "tp": opts.tp, "pp": opts.pp, "dp": dp, "zero": opts.zero, "gpus": dist.get_world_size(),
        "config": opts.config, "vocab_size": opts.vocab_size, "seq_len": opts.seq_len, "global_batch": opts.global_batch,
        "losses": losses, "step_seconds": times, "tokens_per_s": opts.global_batch * opts.seq_len / (sum(steady) / len(steady)),
        "peak_gib": peak.item() / 2**30, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "estimate_gib": estimate_gib(args, opts, dp, per_rank),
    }


def estimate_gib(args, opts, dp: int, per_rank: int) -> float:
    from pipeline.memory import estimate

    est = estimate(args, tp=opts.tp, pp=opts.pp, dp=dp, zero=opts.zero, micro_batch=1, seq_len=opts.seq_len,
                   recompute=opts.recompute, microbatches=per_rank, precision="autocast")
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
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--out")
    opts = parser.parse_args()
    result = run(opts)
    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        print("losses", " ".join(f"{x:.4f}" for x in result["losses"]), flush=True)
        if opts.out:
            json.dump(result, open(opts.out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
