"""The command line of the memory estimator (pipeline/memory/estimate.py): a config file (name or
YAML path) and a data-parallel size in, the per-rank table and a verdict out; exit status 0
fits, 1 does not, 2 impossible.

    python -m pipeline.memory --config configs/recipes/fam-24b-8x80gb.yaml --dp 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.cli import run_main
from model.config import model_args_from_dict, read_config_tree
from pipeline.config.rules import SCHEDULES, check_global_batch
from pipeline.memory.estimate import DEFAULT_ALLOWANCE_GIB, GIB, KERNELS, MemoryEstimate, Settings, estimate
from pipeline.memory.terms import PRECISIONS

_ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer states", "optimizer"),
         ("ZeRO buffers", "zero_buffers"), ("block mask (cached)", "block_mask"),
         ("activations (in flight)", "activations"), ("FAM state + last m blocks' K/V", "fam_state"),
         ("final norm + loss (last)", "head"), ("backward: recompute + grads", "backward_extra"),
         ("micro-chunk boundary states", "boundary_states"))


def format_table(est: MemoryEstimate, gpu_memory_gib: float = 80.0,
                 allowance_gib: float = DEFAULT_ALLOWANCE_GIB) -> str:
    """The per-rank table in GiB, the peak by phase, host memory and the verdict."""
    ranks = est.ranks
    if len(ranks) > 3:  # first, last and the worst of the rest
        middle = max(ranks[1:-1], key=lambda r: r.peak)
        ranks = [ranks[0], middle, ranks[-1]]
    s = est.settings
    head = (f"TP={s.tp} PP={s.pp} DP={s.dp} ZeRO-{s.zero} v={s.virtual_stages} {s.schedule} "
            f"micro-batch {s.micro_batch} x {s.microbatches} per step, seq {s.seq_len}, "
            f"recompute={s.recompute}, SP={s.sequence_parallel}, offload={s.offload_optimizer}, "
            f"{s.precision} {s.dtype}, {s.kernels} kernels, "
            f"{'whole logits' if s.return_logits else 'chunked loss'}"
            + (f", micro-chunks of {s.micro_chunk_len} ({s.micro_chunk_mode}"
               f"{', states offloaded' if s.offload_states else ''})" if s.micro_chunk_len else ""))
    width = 31
    lines = [head, f"{'GiB per GPU':<{width}}" + "".join(f"{f'rank {r.rank} ({r.layers} layers)':>22}" for r in ranks)]
    for label, name in _ROWS:
        lines.append(f"{label:<{width}}" + "".join(f"{getattr(r, name) / GIB:>22.2f}" for r in ranks))
    lines.append(f"{'in-flight micro-batches':<{width}}" + "".join(f"{r.in_flight:>22g}" for r in ranks))
    phases = list(dict.fromkeys(p for r in ranks for p in r.peaks))
    for phase in phases:
        cells = "".join(f"{r.peaks[phase] / GIB:>22.2f}" if phase in r.peaks else f"{'-':>22}" for r in ranks)
        lines.append(f"{'peak at ' + phase:<{width}}" + cells)
    lines.append(f"{'PEAK':<{width}}" + "".join(f"{r.peak / GIB:>22.2f}" for r in ranks))
    host = "".join(f"{r.optimizer_host / GIB:>22.2f}" for r in ranks)
    lines.append(f"{'host (offloaded optimizer)':<{width}}" + host)
    if any(r.boundary_states_host for r in ranks):
        states = "".join(f"{r.boundary_states_host / GIB:>22.2f}" for r in ranks)
        lines.append(f"{'host (boundary states)':<{width}}" + states)
    worst = est.worst()
    verdict = "fits" if est.fits(gpu_memory_gib, allowance_gib) else "DOES NOT FIT"
    lines.append(f"{verdict}: peak {worst.peak / GIB:.2f} GiB (rank {worst.rank}, {worst.peak_phase}) + "
                 f"{allowance_gib:g} GiB allowance (CUDA context, NCCL, fragmentation) vs {gpu_memory_gib:g} GiB")
    return "\n".join(lines)


def settings_from_config(tree: dict) -> dict:
    """Settings fields (and `global_batch`) from a config tree's parallel, data, model and train sections."""
    par, data = tree.get("parallel", {}) or {}, tree.get("data", {}) or {}
    zero = par.get("zero_stage", 0)
    out = dict(
        tp=par.get("tensor_parallel_size", 1), pp=par.get("pipeline_parallel_size", 1), zero=zero,
        virtual_stages=par.get("virtual_stages", 1), layout=par.get("pipeline_layout"),
        schedule=par.get("pipeline_schedule"), sequence_parallel=par.get("sequence_parallel", False),
        offload_optimizer=par.get("zero_offload_optimizer", False), micro_batch=data.get("micro_batch_size", 1),
        seq_len=data.get("seq_len", 8192),
    )
    train = tree.get("train", {}) or {}
    out["train_precision"] = train.get("precision", "auto")
    out.update(micro_chunk_len=train.get("micro_chunk_len") or 0, micro_chunk_mode=train.get("micro_chunk_mode", "exact"),
               offload_states=train.get("micro_chunk_offload_states", False))
    out["global_batch"] = data.get("global_batch_size")
    return out


def estimated_precision(train_precision: str, zero: int) -> tuple[str, str]:
    """(Settings.precision, Settings.dtype) of a run with train.precision `train_precision`, resolved
    as training resolves it on a GPU (pipeline/training/precision.py resolve_precision; the estimate
    is a GPU's): auto and bf16-mixed are the MixedPrecisionOptimizer without ZeRO, DeepSpeed's bf16
    under it; bf16-autocast is fp32 weights under autocast; fp32 is fp32 weights and fp32 math
    (precision "autocast" with dtype fp32: nothing is cast; under ZeRO, DeepSpeed's fp32 optimizer,
    whose buffers this counts in fp32)."""
    if train_precision == "fp32":
        return "autocast", "fp32"
    if train_precision == "bf16-autocast":
        if zero:
            raise ValueError(f"train.precision=bf16-autocast with ZeRO-{zero}: training refuses it (pipeline/config/"
                             "rules.py check_precision); use bf16-mixed, or --precision bf16-zero here")
        return "autocast", "bf16"
    if train_precision in ("auto", "bf16-mixed"):
        return ("bf16-zero" if zero else "bf16-mixed"), "bf16"
    raise ValueError(f"train.precision={train_precision!r}: must be one of auto, fp32, bf16-autocast, bf16-mixed")


def precision_line(est: MemoryEstimate, train_precision: str, given: str | None) -> str:
    """Which precision the table is for, and where it came from."""
    s = est.settings
    why = f"--precision {given}" if given else f"train.precision={train_precision} on a GPU" + \
        (f", ZeRO-{s.zero}" if s.zero else "")
    return f"precision: {s.precision} {s.dtype} ({why})"


def estimate_config(name_or_path: str | Path, dp: int = 1, **overrides) -> MemoryEstimate:
    """estimate() for a config file (name or YAML path) and a data-parallel size; keyword
    arguments override the file's values (None keeps them): Settings fields, global_batch, vocab_size."""
    tree = read_config_tree(name_or_path)
    args = model_args_from_dict(dict(tree.get("model", {}) or {}), f"{name_or_path}: model")
    kw = settings_from_config(tree)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    train_precision = kw.pop("train_precision")
    if "precision" not in kw:  # after the overrides: --zero changes which optimizer runs
        kw["precision"], dtype = estimated_precision(train_precision, kw["zero"])
        kw.setdefault("dtype", dtype)
    global_batch = kw.pop("global_batch")
    vocab = kw.pop("vocab_size", None)
    if vocab:
        args.vocab_size = vocab
    if global_batch and not kw.get("microbatches"):
        check_global_batch(global_batch, kw["micro_batch"], dp)
        kw["microbatches"] = global_batch // (kw["micro_batch"] * dp)
    return estimate(args, Settings(dp=dp, **kw))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.memory", description="Per-GPU memory estimate of a training step")
    p.add_argument("--config", required=True, help="config name (configs/<name>.yaml) or YAML path")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (world / (TP x PP))")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--global-batch", type=int, help="samples per step (default: data.global_batch_size)")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--virtual-stages", type=int)
    p.add_argument("--pipeline-schedule", choices=SCHEDULES)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="default: from the config's train.precision as a GPU runs it: auto/bf16-mixed -> bf16-mixed "
                        "(bf16-zero with ZeRO >= 1), bf16-autocast -> autocast, fp32 -> autocast with --dtype fp32")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="compute dtype (default: the precision's)")
    p.add_argument("--kernels", choices=KERNELS, default="cuda")
    p.add_argument("--vocab-size", type=int, help="override model.vocab_size (benchmarks use 32000)")
    p.add_argument("--return-logits", action="store_true",
                   help="the loss from whole logits (model(..., return_logits=True)), not the chunked lm_loss")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--allowance-gib", type=float, default=DEFAULT_ALLOWANCE_GIB)
    p.add_argument("--micro-chunk-len", type=int, help="train.micro_chunk_len (0: off)")
    p.add_argument("--micro-chunk-mode", choices=("exact", "truncated"), help="train.micro_chunk_mode")
    p.add_argument("--offload-states", action=argparse.BooleanOptionalAction, default=None,
                   help="train.micro_chunk_offload_states")
    return p


def main(argv: list[str] | None = None) -> int:
    """A bad config or setting ends as one line and exit status 2 (data_prep/cli.py run_main)."""
    return run_main(_main, argv, prog="python -m pipeline.memory")


def _main(argv: list[str]) -> int:
    o = _parser().parse_args(argv)
    overrides = dict(tp=o.tp, pp=o.pp, zero=o.zero, micro_batch=o.micro_batch, seq_len=o.seq_len,
                     recompute=o.recompute, sequence_parallel=o.sequence_parallel,
                     offload_optimizer=o.offload_optimizer, virtual_stages=o.virtual_stages,
                     schedule=o.pipeline_schedule, precision=o.precision, dtype=o.dtype, kernels=o.kernels,
                     vocab_size=o.vocab_size, global_batch=o.global_batch, return_logits=o.return_logits or None,
                     micro_chunk_len=o.micro_chunk_len, micro_chunk_mode=o.micro_chunk_mode,
                     offload_states=o.offload_states)
    est = estimate_config(o.config, dp=o.dp, **overrides)
    train_precision = (read_config_tree(o.config).get("train", {}) or {}).get("precision", "auto")
    print(precision_line(est, train_precision, o.precision))
    print(format_table(est, o.gpu_memory_gib, o.allowance_gib))
    return 0 if est.fits(o.gpu_memory_gib, o.allowance_gib) else 1
