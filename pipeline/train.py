"""`python -m pipeline.train`: pretrain TransformerFAM, on one CPU process or under torchrun.

    python -m pipeline.train --config configs/demo.yaml [--section.key=value ...]
    torchrun --nproc_per_node 2 -m pipeline.train --config configs/demo.yaml --parallel.tensor_parallel_size=2
    python -m pipeline.train --config configs/demo.yaml --help   # every key, its value here and meaning

Each step: gradient accumulation over micro-batches, each with RPO offsets and (with probability
train.rsp_probability) the FAM saved by the previous step as the initial state (RSP, fam-paper.md
§1.6); gradients averaged over the data-parallel group; TP-aware global-norm clipping; AdamW;
warmup + cosine LR. Parallelism: TP (optionally with sequence parallelism) x PP x DP. With
PP > 1 the step's micro-batches run through a torch.distributed.pipelining schedule over this
rank's stages (pipeline/pipeline_parallel.py); with parallel.zero_stage >= 1 DeepSpeed's ZeRO
engine (pipeline/zero.py) reduces, clips and steps instead of the plain loop. Validation every
train.eval_interval_steps (no RPO/RSP); PassKey and loss by position every eval.interval_steps
(pipeline/evaluation/in_loop.py); checkpoints every checkpoint.save_interval_steps and at
the end (none with checkpoint.enabled=false), MLflow from rank 0. SIGINT/SIGTERM finish the current
step, write a checkpoint and exit; `checkpoint.resume=auto` continues from it, refusing before any
work a config that differs from the checkpoint's in keys not safe to change (pipeline/config_checks.py
RESUME_SAFE_KEYS). A rerun of a finished run trains nothing and writes nothing. The summary ends with
the peak GPU and host memory over all ranks (pipeline/distributed.py peak_memory). Input checks,
checkpoint saving, MLflow start and the closing summary are in pipeline/train_io.py.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.cli import run_main
from model import FAMState, build_model, init_parallel
from pipeline import config as config_lib
from pipeline import config_checks
from pipeline.console import IntervalMeter, build_progress_bar, log_peak_memory, setup_logging
from pipeline.distributed import (Ranks, all_reduce_mean, all_reduce_sum, average_gradients, broadcast_tensors,
                                  build_ranks, destroy_parallel, launch_world_size, peak_memory, select_device)
from pipeline.evaluation.in_loop import InLoopEvaluator
from pipeline.fault import NonFiniteGuard, SampleKeyRecorder, StopRequest, init_distributed, write_status
from pipeline.flops import flops_per_token, peak_flops
from pipeline.optim import build_optimizer, clip_grads, lr_at, set_lr
from pipeline.parallel_steps import (build_engine, build_pipeline, model_init_context, pipeline_eval,
                                     pipeline_forward_backward, zero_forward_backward_step)
from pipeline.train_io import check_inputs, finish_run, report_finished, save, start_tracking
from pipeline.trainer_state import (draw_step, micro_batch_offsets, pipeline_chunks, resolve_resume, restore,
                                   share_rsp_state)

log = logging.getLogger("famtron")
PROG = "python -m pipeline.train"


@dataclass
class Trainer:
    """What the loop works on; built once by `build_trainer`, advanced by `train_step`."""

    cfg: config_lib.Config
    ranks: Ranks
    device: torch.device
    model: Any
    optimizer: torch.optim.Optimizer
    loader: Any
    valid_loader: Any
    accum: int  # micro-batches per step on each rank
    use_bf16: bool
    step: int = 0
    rsp_state: FAMState | None = None  # the FAM saved by the previous step (RSP)
    params: list = field(default_factory=list)
    nonfinite: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(0))
    keys: SampleKeyRecorder = field(default_factory=lambda: SampleKeyRecorder(None, 0))
    stages: list | None = None  # PP > 1: this rank's (chunk index, FAMStage); `model` is their ModuleList
    schedule: Any = None  # PP > 1: the pipelining schedule over `stages`
    engine: Any = None  # zero_stage >= 1: the DeepSpeed engine, which owns reduce, clip and step
    evaluator: Any = None  # pipeline/evaluation/in_loop.py: PassKey / loss by position (eval section)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)


def start_processes(cfg: config_lib.Config) -> tuple[Ranks, torch.device]:
    """Everything before the model: config and input checks (before any process group exists to
    hang on), process groups with timeouts, rank-0 logging, seeds."""
    config_checks.validate(cfg, launch_world_size())
    check_inputs(cfg)
    device = select_device(cfg.train.device)
    backend = None if cfg.parallel.backend == "auto" else cfg.parallel.backend
    p = cfg.parallel
    init_distributed(p.tensor_parallel_size, p.pipeline_parallel_size, backend, p.timeout_seconds)  # with timeouts
    init_parallel(p.tensor_parallel_size, p.pipeline_parallel_size, backend=backend)
    ranks = build_ranks()
    setup_logging(ranks.is_rank0)
    seed_everything(cfg.train.seed, device)
    return ranks, device


def build_trainer(cfg: config_lib.Config, started: tuple[Ranks, torch.device] | None = None) -> Trainer:
    """Seeded model, optimizer and loaders on the process groups of `started` (start_processes'
    result; started here when None)."""
    from pipeline.data import ShardLoader, build_valid_loader

    ranks, device = started or start_processes(cfg)
    p = cfg.parallel
    accum = config_checks.grad_accumulation_steps(cfg, ranks.world_size)
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    stages = schedule = None
    if p.pipeline_parallel_size > 1:  # only this rank's layers are ever built
        stages, schedule = build_pipeline(cfg, ranks, accum, device)
        model = torch.nn.ModuleList(stage for _, stage in stages)
    else:
        with model_init_context(cfg, ranks, accum, use_bf16):  # ZeRO-3: partitioned as it is built
            model = build_model(cfg.model, params_dtype=torch.float32, device=device, seed=cfg.train.seed,
                                sequence_parallel=p.sequence_parallel)
    params = [p for p in model.parameters() if p.requires_grad]
    if p.zero_stage != 3:  # ZeRO-3's partitions came from DP rank 0's values already
        broadcast_tensors([p.data for p in params], ranks.dp_group)  # DP replicas start identical
    optimizer = build_optimizer(model, cfg.optim, device.type)
    engine = build_engine(cfg, ranks, model, stages, optimizer, accum, use_bf16) if p.zero_stage else None
    d = cfg.data
    if d.train_blend:  # several manifests mixed in proportion (pipeline/blend.py)
        from pipeline.blend import BlendLoader

        loader = BlendLoader(d.train_blend, d.train_blend_weights, d.micro_batch_size, d.seq_len, dp_rank=ranks.dp_rank,
                             dp_world_size=ranks.dp_size, seed=d.seed, shuffle=d.shuffle,
                             verify_checksums=d.verify_checksums)
    else:
        loader = ShardLoader(d.train_manifest, d.micro_batch_size, d.seq_len, dp_rank=ranks.dp_rank,
                             dp_world_size=ranks.dp_size, seed=d.seed, shuffle=d.shuffle,
                             verify_checksums=d.verify_checksums)
    valid_loader = None
    if d.valid_manifest:
        valid_loader = build_valid_loader(d.valid_manifest, d.micro_batch_size, d.seq_len, ranks.dp_rank, ranks.dp_size,
                                          verify_checksums=d.verify_checksums)
    return Trainer(cfg, ranks, device, model, optimizer, loader, valid_loader, accum=accum, params=params,
                   use_bf16=use_bf16, nonfinite=NonFiniteGuard(cfg.train.max_nonfinite_steps),
                   keys=SampleKeyRecorder(cfg.train.record_sample_keys, ranks.rank), stages=stages, schedule=schedule,
                   engine=engine)


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)  # GPU init of TP layers draws from megatron's tracker


def train_step(tr: Trainer, data_iter) -> tuple[float, float, float, bool, bool]:
    """One optimizer step; returns (DP-mean loss, pre-clip grad norm, lr, started from saved FAM,
    skipped). A NaN/inf step consumes its batches but updates nothing (pipeline/fault.py); under
    ZeRO the engine has already discarded that update itself (pipeline/zero.py), and the guard counts it."""
    cfg, ranks, d = tr.cfg, tr.ranks, tr.cfg.data
    draws = draw_step(cfg.train.seed, tr.step, d.global_batch_size, cfg.model.rope_base, cfg.train.rpo,
                      cfg.train.rsp_probability)
    use_rsp = cfg.model.uses_fam
    start_state = tr.rsp_state if use_rsp and draws.use_saved_fam else None
    tokens, offsets = [], []
    for a in range(tr.accum):
        batch = next(data_iter)
        tr.keys.add(batch["keys"])
        tokens.append(batch["tokens"].to(tr.device, non_blocking=True))  # [b, s + 1]
        offsets.append(micro_batch_offsets(draws, a, ranks, d.micro_batch_size).to(tr.device))  # [b]
    lr = lr_at(tr.step, cfg.optim, cfg.train.steps)
    if tr.engine is not None:
        step_loss, grad_norm, next_rsp = zero_forward_backward_step(tr, tokens, offsets, start_state, lr)
    else:
        tr.optimizer.zero_grad(set_to_none=True)
        run_micro_batches = pipeline_forward_backward if tr.stages else forward_backward
        step_loss, next_rsp = run_micro_batches(tr, tokens, offsets, start_state)
        average_gradients(tr.params, ranks.dp_group)
        grad_norm = clip_grads(tr.params, cfg.optim.grad_clip, ranks.tp_group, ranks.pp_group)
    loss = float(all_reduce_mean(step_loss, ranks.dp_group))
    tr.step += 1
    # Loss and norm are the same on every rank, so every rank skips (or raises) together.
    skipped = tr.nonfinite.should_skip(tr.step, loss, grad_norm)
    if not skipped:
        if tr.engine is None:
            set_lr(tr.optimizer, lr)
            tr.optimizer.step()
        if use_rsp:
            tr.rsp_state = share_rsp_state(next_rsp, ranks)
    if tr.engine is None:
        tr.optimizer.zero_grad(set_to_none=True)
    tr.keys.step_done(tr.step)
    return loss, grad_norm, lr, start_state is not None, skipped


def forward_backward(tr: Trainer, tokens: list, offsets: list, start_state) -> tuple[torch.Tensor, FAMState | None]:
    """Gradient accumulation over the micro-batches; returns (mean loss, RSP state to save: the FAM
    of the first sample of the first micro-batch)."""
    step_loss, next_rsp = torch.zeros((), device=tr.device), None
    for a, (batch, offset) in enumerate(zip(tokens, offsets)):
        with tr.autocast():
            out = tr.model(batch[:, :-1], labels=batch[:, 1:], state=start_state, position_offset=offset,
                           return_logits=False)
        (out.loss / tr.accum).backward()
        step_loss += out.loss.detach() / tr.accum
        if a == 0 and tr.cfg.model.uses_fam:
            next_rsp = out.state.fam_only(0)
    return step_loss, next_rsp


def evaluate(tr: Trainer) -> float:
    """Mean validation loss, no RPO or RSP. eval_steps counts global batches, so each rank takes
    eval_steps x accum micro-batches and DP=2 evaluates the same samples as DP=1."""
    tr.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=tr.device)  # [loss sum, micro-batches]
    batches = iter(tr.valid_loader)
    with torch.no_grad():
        for _ in range(tr.cfg.train.eval_steps):
            tokens = [b["tokens"].to(tr.device) for b in itertools.islice(batches, tr.accum)]
            if len(tokens) < tr.accum:
                break
            with tr.autocast():
                losses = pipeline_eval(tr, torch.cat(tokens)) if tr.stages else [
                    tr.model(t[:, :-1], labels=t[:, 1:], return_logits=False).loss for t in tokens]
            total += torch.tensor([sum(float(x) for x in losses), len(losses)], dtype=torch.float64, device=tr.device)
    tr.model.train()
    total = all_reduce_sum(all_reduce_sum(total, tr.ranks.pp_group), tr.ranks.dp_group)
    return float(total[0] / total[1])


def run(cfg: config_lib.Config) -> dict:
    """Train as configured; returns the summary (also written to <run_dir>/summary.json).
    Process groups this call created are destroyed on the way out, so a caller (a test, a
    notebook) can run again with other parallel sizes."""
    owns_groups = not torch.distributed.is_initialized()
    try:
        return _train(cfg)
    finally:
        if owns_groups:
            destroy_parallel()


def _train(cfg: config_lib.Config) -> dict:
    started = start_processes(cfg)
    t = cfg.train
    resume = resolve_resume(cfg, started[0])  # config and checkpoint checks, before the model is built
    if resume is not None and resume.step >= t.steps:
        return report_finished(cfg, resume, started[0])
    tr, run_id, eval_state = build_trainer(cfg, started), None, None
    if resume is not None:
        trainer_state, tr.rsp_state = restore(resume.path, tr.ranks, tr.model, tr.optimizer, tr.loader, tr.device,
                                              stages=tr.stages, engine=tr.engine, chunks=pipeline_chunks(cfg))
        tr.step, run_id = trainer_state["step"], trainer_state.get("mlflow_run_id")
        eval_state = trainer_state.get("eval")
        log.info("resumed from %s (step %d)", resume.path, tr.step)
    tracker = start_tracking(tr, run_id)
    tr.evaluator = InLoopEvaluator.build(tr, tracker, eval_state)
    meter = IntervalMeter(cfg.data.global_batch_size * cfg.data.seq_len, flops_per_token(cfg.model, cfg.data.seq_len),
                          peak_flops(tr.device, t.peak_tflops), tr.ranks.world_size, t.steps)
    last_step = min(t.steps, tr.step + t.exit_after_steps) if t.exit_after_steps else t.steps
    history: dict[str, list] = {"losses": [], "val_losses": [], "grad_norms": []}
    rsp_steps, last_ckpt, status, save_seconds = 0, resume.path if resume else None, "FAILED", 0.0
    memory = dict.fromkeys(("peak_gpu_gib", "peak_host_gib", "peak_host_node_gib"))  # unknown if the run fails
    bar = build_progress_bar(tr.ranks.is_rank0 and t.progress_bar, t.steps, tr.step)
    data_iter = iter(tr.loader)
    try:
        if tr.evaluator.catch_up() and cfg.checkpoint.enabled:  # an evaluation the stopped run owed, recorded
            last_ckpt = save(tr, tracker)
        with StopRequest(t.max_wall_seconds) as stop:
            while tr.step < last_step:
                started = time.perf_counter()
                loss, grad_norm, lr, used_saved_fam, skipped = train_step(tr, data_iter)
                step_seconds = time.perf_counter() - started
                if not skipped:  # a skipped step's NaN stays out of the interval means
                    meter.add(loss, step_seconds)
                rsp_steps += used_saved_fam and not skipped
                stop.check_budget(step_seconds, save_seconds)
                stopping = stop.agreed(tr.device)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                log_due = tr.step % t.log_interval_steps == 0 or tr.step == last_step or stopping
                if log_due and meter.steps:
                    metrics = meter.report(tr.step, lr, grad_norm)
                    if hasattr(tr.loader, "realised_proportions"):  # a blend: the mix actually drawn
                        mix = tr.loader.realised_proportions()
                        metrics.update({f"blend_{i}": share for i, share in enumerate(mix.values())})
                        log.info("blend so far: %s", ", ".join(f"{p} {share:.3f}" for p, share in mix.items()))
                    history["losses"].append((tr.step, metrics["loss"]))
                    history["grad_norms"].append((tr.step, grad_norm))
                    tracker.log_metrics(tr.step, metrics)
                if tr.valid_loader is not None and (
                    tr.step == t.steps or (t.eval_interval_steps and tr.step % t.eval_interval_steps == 0)
                ):
                    val = evaluate(tr)
                    history["val_losses"].append((tr.step, val))
                    log.info("step %d | validation loss %.4f", tr.step, val)
                    tracker.log_metrics(tr.step, {"val_loss": val})
                evaluated = tr.evaluator.maybe_run(tr.step, stopping)  # checkpointed below with its state
                tracker.maybe_flush(tr.step)
                interval = cfg.checkpoint.save_interval_steps
                due = (interval and tr.step % interval == 0) or tr.step == last_step or stopping or evaluated
                if due and cfg.checkpoint.enabled:
                    save_started = time.perf_counter()
                    last_ckpt = save(tr, tracker)
                    save_seconds = max(save_seconds, time.perf_counter() - save_started)
                if stopping:
                    break
        status = "FINISHED" if tr.step == t.steps else "KILLED"  # KILLED: stopped early, resumable
        memory = peak_memory(tr.device)
        log_peak_memory(memory)
    finally:
        if bar is not None:
            bar.close()
        losses, vals = history["losses"], history["val_losses"]
        summary = {
            "status": status, "step": tr.step, "steps": t.steps, "first_loss": losses[0][1] if losses else None,
            "final_loss": losses[-1][1] if losses else None, "final_val_loss": vals[-1][1] if vals else None,
            **history, "rsp_steps": rsp_steps, "skipped_steps": tr.nonfinite.skipped, "last_checkpoint": str(last_ckpt),
            **memory,
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": cfg.tracking.tracking_uri, "run_dir": t.run_dir,
        }
        if tr.ranks.is_rank0:
            write_status(status)  # for slurm/train.sbatch: KILLED means requeue and resume
            finish_run(tracker, summary, Path(t.run_dir))
    return summary


def build_parser(cfg: config_lib.Config | None = None) -> argparse.ArgumentParser:
    """The command line; its epilog lists every key with cfg's value (the --config given) or the default."""
    source = "the values of --config and the overrides given" if cfg is not None else "their defaults"
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"overrides (--section.key=value), with {source}:\n" + config_lib.describe_keys(cfg),
    )
    parser.add_argument("--config", help="YAML file or config name (configs/<name>.yaml); `base:` is followed")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (or FAMTRON_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """A user error (config, inputs, checkpoint) ends as one line and exit status 2, without a
    traceback unless --debug is given (data_prep/cli.py run_main)."""
    return run_main(_main, argv, prog=PROG)


def _main(argv: list[str]) -> int:
    helping = any(arg in ("-h", "--help") for arg in argv)
    args, overrides = build_parser().parse_known_args([arg for arg in argv if arg not in ("-h", "--help")])
    cfg = config_lib.load_config(args.config, overrides)
    if helping:  # after loading, so the keys show the values this command line would train with
        build_parser(cfg).parse_args(["--help"])
    config_checks.validate(cfg, launch_world_size())
    check_inputs(cfg)
    summary = run(cfg)
    return 0 if summary["status"] in ("FINISHED", "KILLED") else 1


if __name__ == "__main__":
    sys.exit(main())
