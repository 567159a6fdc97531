"""Every rule that spans config keys, written once: `validate()` runs them all, once per launch.

    validate(cfg, world_size=2)         # ValueError naming the key(s) of the first rule broken

One clause per rule, each message written once. The parallel rules read a `ParallelPlan`, so the
memory estimator (pipeline/memory/estimate.py, no Config there) checks the same combinations with
the same messages, and the pieces that build a layout call the clause that guards their
arguments (`layer_counts` for pipeline/parallel/stages.py, `check_schedule` and
`check_interleaved_micro_batches` for its schedule, `check_zero` for the DeepSpeed JSON). Rules that
need only model keys and the TP size are `ModelArgs.validate` (model/config.py), which the model
API runs too; `check_parallel` calls it. Also the derived batch shape: data-parallel size and
micro-batches per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.config import ModelArgs, check_sequence_parallel_length
from pipeline.config.tree import Config, EvalConfig

SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
BACKENDS = ("auto", "gloo", "nccl")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size)


def grad_accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank."""
    return cfg.data.global_batch_size // (cfg.data.micro_batch_size * data_parallel_size(cfg, world_size))


@dataclass(frozen=True)
class ParallelPlan:
    """The numbers the parallel rules read. `world_size` None: `data_parallel_size` is given (the
    memory estimator); else it is world / (TP x PP), checked first."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    world_size: int | None = None
    zero_stage: int = 0
    zero_offload_optimizer: bool = False
    sequence_parallel: bool = False
    virtual_stages: int = 1
    pipeline_schedule: str = "1f1b"
    pipeline_layout: list[int] | None = None
    seq_len: int = 1
    micro_batch_size: int = 1
    global_batch_size: int = 1
    deepspeed_overrides: bool = False  # any given
    micro_chunks: int = 1  # per sample; with PP each is one of the schedule's micro-batches (issue 14)

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> ParallelPlan:
        p, d = cfg.parallel, cfg.data
        return cls(p.tensor_parallel_size, p.pipeline_parallel_size, 0, world_size, p.zero_stage,
                   p.zero_offload_optimizer, p.sequence_parallel, p.virtual_stages, p.pipeline_schedule,
                   p.pipeline_layout, d.seq_len, d.micro_batch_size, d.global_batch_size, bool(p.deepspeed_overrides),
                   micro_chunks_per_sample(cfg))


# ---------------------------------------------------------------- the parallel rules, one per function


def check_positive(sizes: dict[str, int]) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")


def check_world(world_size: int, tp: int, pp: int) -> None:
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of parallel.tensor_parallel_size={tp}"
                         f" x parallel.pipeline_parallel_size={pp}")


def check_global_batch(global_batch_size: int, micro_batch_size: int, dp: int) -> None:
    if global_batch_size < 1 or global_batch_size % (micro_batch_size * dp):
        raise ValueError(f"data.global_batch_size={global_batch_size} must be a positive multiple of "
                         f"data.micro_batch_size={micro_batch_size} x data-parallel size {dp}")


def check_zero(zero_stage: int, pp: int, offload_optimizer: bool) -> None:
    """The ZeRO stage, and what it cannot be combined with."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage={zero_stage}: must be 0, 1, 2 or 3")
    if zero_stage in (2, 3) and pp > 1:
        raise ValueError(
            f"parallel.zero_stage={zero_stage} with parallel.pipeline_parallel_size={pp}: ZeRO-2 partitions "
            "gradients and ZeRO-3 gathers parameters inside each backward, which the pipeline schedule runs outside "
            "DeepSpeed; use zero_stage=1 or pipeline_parallel_size=1")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("parallel.zero_offload_optimizer=true needs parallel.zero_stage >= 1 (DeepSpeed ZeRO-Offload)")
    if offload_optimizer and pp > 1:
        raise ValueError(f"parallel.zero_offload_optimizer=true with parallel.pipeline_parallel_size={pp}: "
                         "DeepSpeed's offload path reduces gradients inside backward; use PP=1")


def check_sequence_parallel(sequence_parallel: bool, tp: int, seq_len: int) -> None:
    if sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel=true needs parallel.tensor_parallel_size > 1")
    if sequence_parallel:
        check_sequence_parallel_length(seq_len, tp, "data.seq_len")


def check_schedule(schedule: str, virtual_stages: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pipeline_schedule={schedule!r}: must be one of {SCHEDULES}")
    if virtual_stages > 1 and schedule != "interleaved_1f1b":
        raise ValueError(f"parallel.virtual_stages={virtual_stages} needs parallel.pipeline_schedule='interleaved_1f1b'")


def check_interleaved_micro_batches(schedule: str, micro_batches: int, pp: int, derivation: str = "") -> None:
    """`derivation` shows where the micro-batch count comes from, when the caller knows."""
    if schedule == "interleaved_1f1b" and micro_batches % pp:
        raise ValueError(f"parallel.pipeline_schedule=interleaved_1f1b needs micro-batches per step ({micro_batches}"
                         f"{derivation}) divisible by parallel.pipeline_parallel_size={pp}")


def layer_counts(num_layers: int, num_chunks: int, layout: list[int] | None = None) -> list[int]:
    """Layers per pipeline chunk (stage x virtual stage), in model order: the layout, or an even split."""
    if layout is not None:
        if len(layout) != num_chunks or sum(layout) != num_layers or min(layout) < 1:
            raise ValueError(f"parallel.pipeline_layout={layout}: needs {num_chunks} positive layer counts "
                             f"(pipeline_parallel_size x virtual_stages) summing to model.num_layers={num_layers}")
        return list(layout)
    if num_layers % num_chunks:
        even = [num_layers // num_chunks + (i < num_layers % num_chunks) for i in range(num_chunks)]
        raise ValueError(f"model.num_layers={num_layers} does not divide over {num_chunks} pipeline chunks (parallel."
                         "pipeline_parallel_size x parallel.virtual_stages); set parallel.pipeline_layout, e.g. "
                         f"{even}")
    return [num_layers // num_chunks] * num_chunks


def check_parallel(model: ModelArgs, plan: ParallelPlan) -> int:
    """Raise ValueError naming the setting of the first impossible combination; returns the
    data-parallel size."""
    tp, pp = plan.tensor_parallel_size, plan.pipeline_parallel_size
    check_positive({"parallel.pipeline_parallel_size": pp, "parallel.virtual_stages": plan.virtual_stages,
                    "data.seq_len": plan.seq_len, "data.micro_batch_size": plan.micro_batch_size})
    model.validate(tp, plan.sequence_parallel)
    dp = plan.data_parallel_size
    if plan.world_size is not None:
        check_world(plan.world_size, tp, pp)
        dp = plan.world_size // (tp * pp)
    check_positive({"data-parallel size": dp})
    check_global_batch(plan.global_batch_size, plan.micro_batch_size, dp)
    check_zero(plan.zero_stage, pp, plan.zero_offload_optimizer)
    check_sequence_parallel(plan.sequence_parallel, tp, plan.seq_len)
    check_schedule(plan.pipeline_schedule, plan.virtual_stages)
    micro_batches = plan.global_batch_size // (plan.micro_batch_size * dp) * plan.micro_chunks
    derivation = (f" = data.global_batch_size={plan.global_batch_size} / (data.micro_batch_size="
                  f"{plan.micro_batch_size} x DP {dp})" + (f" x {plan.micro_chunks} micro-chunks per sample"
                                                            if plan.micro_chunks > 1 else ""))
    check_interleaved_micro_batches(plan.pipeline_schedule, micro_batches, pp, derivation)
    layer_counts(model.num_layers, pp * plan.virtual_stages, plan.pipeline_layout)
    if plan.deepspeed_overrides and plan.zero_stage == 0:
        raise ValueError("parallel.deepspeed_overrides is set but parallel.zero_stage=0 (DeepSpeed is not used)")
    return dp


# ---------------------------------------------------------------- the whole config


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ValueError naming the key(s) of the first rule the config breaks. One clause per rule."""
    check_parallel(cfg.model, ParallelPlan.from_config(cfg, world_size))
    check_data(cfg)
    check_optim(cfg)
    check_train(cfg)
    check_checkpoint(cfg)
    check_eval(cfg)
    check_precision(cfg)
    check_micro_chunks(cfg)


def check_data(cfg: Config) -> None:
    d, p = cfg.data, cfg.parallel
    if p.backend not in BACKENDS:
        raise ValueError(f"parallel.backend={p.backend!r}: must be one of {', '.join(BACKENDS)}")
    if p.timeout_seconds <= 0:
        raise ValueError(f"parallel.timeout_seconds={p.timeout_seconds}: must be > 0")
    if d.train_blend:
        if not d.train_blend_weights or len(d.train_blend_weights) != len(d.train_blend):
            raise ValueError(f"data.train_blend has {len(d.train_blend)} manifests but data.train_blend_weights="
                             f"{d.train_blend_weights}: give one positive weight per manifest")
        if min(d.train_blend_weights) <= 0:
            raise ValueError(f"data.train_blend_weights={d.train_blend_weights}: weights must be positive")
    elif not d.train_manifest:
        raise ValueError("data.train_manifest is not set: give the manifest.json written by python -m data_prep.shard "
                         "(or data.train_blend with data.train_blend_weights)")
    if cfg.model.attention == "fam" and cfg.model.block_size > d.seq_len:
        raise ValueError(
            f"data.seq_len={d.seq_len} and model.block_size={cfg.model.block_size} do not fit: a sample must hold"
            " at least one full block, or the FAM/BSWA memory is never used in training"
        )


def check_optim(cfg: Config) -> None:
    o, steps = cfg.optim, cfg.train.steps
    if o.lr <= 0:
        raise ValueError(f"optim.lr={o.lr}: must be > 0")
    if not 0 <= o.min_lr <= o.lr:
        raise ValueError(f"optim.min_lr={o.min_lr}: must be in [0, optim.lr={o.lr}]")
    if o.weight_decay < 0:
        raise ValueError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas={o.betas}: must be two numbers in [0, 1)")
    if o.eps <= 0:
        raise ValueError(f"optim.eps={o.eps}: must be > 0")
    if o.grad_clip < 0:
        raise ValueError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables clipping)")
    if o.schedule != "cosine":
        raise ValueError(f"optim.schedule={o.schedule!r}: only 'cosine' is implemented")
    if steps < 1:
        raise ValueError(f"train.steps={steps}: must be >= 1")
    if not 0 <= o.warmup_steps <= steps:
        raise ValueError(f"optim.warmup_steps={o.warmup_steps}: must be in [0, train.steps={steps}]")


def check_train(cfg: Config) -> None:
    t = cfg.train
    if t.log_interval_steps < 1:
        raise ValueError(f"train.log_interval_steps={t.log_interval_steps}: must be >= 1")
    if t.eval_interval_steps < 0:
        raise ValueError(f"train.eval_interval_steps={t.eval_interval_steps}: must be >= 0 (0: only at the end)")
    if t.eval_steps < 1:
        raise ValueError(f"train.eval_steps={t.eval_steps}: must be >= 1")
    if t.exit_after_steps is not None and t.exit_after_steps < 1:
        raise ValueError(f"train.exit_after_steps={t.exit_after_steps}: must be >= 1 or null")
    if t.max_wall_seconds is not None and t.max_wall_seconds <= 0:
        raise ValueError(f"train.max_wall_seconds={t.max_wall_seconds}: must be > 0 or null")
    if t.max_nonfinite_steps < 0:
        raise ValueError(f"train.max_nonfinite_steps={t.max_nonfinite_steps}: must be >= 0")
    if not 0 <= t.rsp_probability <= 1:
        raise ValueError(f"train.rsp_probability={t.rsp_probability}: must be in [0, 1]")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device={t.device!r}: must be one of auto, cpu, cuda")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ValueError(f"train.peak_tflops={t.peak_tflops}: must be > 0 or null")


def check_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    if c.save_interval_steps < 0:
        raise ValueError(f"checkpoint.save_interval_steps={c.save_interval_steps}: must be >= 0 (0: only at the end)")
    if c.keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={c.keep_last}: must be >= 1")
    if c.resume not in ("auto", "none") and not Path(c.resume).is_dir():
        raise ValueError(f"checkpoint.resume={c.resume!r}: must be auto, none or an existing checkpoint folder")
    if cfg.tracking.flush_interval_steps < 1:
        raise ValueError(f"tracking.flush_interval_steps={cfg.tracking.flush_interval_steps}: must be >= 1")


def eval_tokens(e: EvalConfig) -> int:
    """Tokens one evaluation streams through the model (PassKey prompts + held-out sequences)."""
    passkey = sum(e.passkey_lengths) * len(e.passkey_depths) * e.passkey_trials
    position = e.position_loss_length * e.position_loss_sequences if e.position_loss_manifest else 0
    return passkey + position


def check_eval(cfg: Config) -> None:
    """The eval section (in-loop evaluation, pipeline/evaluation/settings.py says why each rule)."""
    e, p = cfg.eval, cfg.parallel
    if e.interval_steps < 0:
        raise ValueError(f"eval.interval_steps={e.interval_steps}: must be >= 0 (0: only at the end)")
    if not e.enabled:
        return
    if p.tensor_parallel_size > 1 or p.pipeline_parallel_size > 1:
        raise ValueError(
            f"eval.enabled=true with parallel.tensor_parallel_size={p.tensor_parallel_size} and "
            f"parallel.pipeline_parallel_size={p.pipeline_parallel_size}: the in-loop evaluation runs the whole model "
            "in each process and TP/PP ranks hold only shards of it; set eval.enabled=false and evaluate the "
            "checkpoints with python -m pipeline.evaluate (it loads any layout as one model)")
    if p.zero_stage == 3:
        raise ValueError("eval.enabled=true with parallel.zero_stage=3: ZeRO-3 partitions the weights over the ranks "
                         "and the in-loop evaluation needs them whole; use zero_stage <= 2, or set "
                         "eval.enabled=false and evaluate the checkpoints with python -m pipeline.evaluate")
    if not e.passkey_lengths and not e.position_loss_manifest:
        raise ValueError("eval.enabled=true but there is nothing to evaluate: set eval.passkey_lengths and/or "
                         "eval.position_loss_manifest")
    if any(n < 1 for n in e.passkey_lengths):
        raise ValueError(f"eval.passkey_lengths={e.passkey_lengths}: lengths are token counts >= 1")
    if e.passkey_lengths and (not e.passkey_depths or any(not 0 <= d <= 1 for d in e.passkey_depths)):
        raise ValueError(f"eval.passkey_depths={e.passkey_depths}: give fractions in [0, 1] (0: key first)")
    for key in ("passkey_trials", "passkey_batch_size", "position_loss_length", "position_loss_sequences",
                "position_loss_buckets", "chunk_tokens", "max_tokens"):
        if getattr(e, key) < 1:
            raise ValueError(f"eval.{key}={getattr(e, key)}: must be >= 1")
    if e.chunk_tokens % cfg.model.block_size:
        raise ValueError(f"eval.chunk_tokens={e.chunk_tokens}: must be a multiple of model.block_size="
                         f"{cfg.model.block_size} (the state is carried across whole blocks)")
    if eval_tokens(e) > e.max_tokens:
        raise ValueError(
            f"one evaluation would stream {eval_tokens(e):,} tokens (sum(eval.passkey_lengths) x depths x "
            f"eval.passkey_trials + eval.position_loss_length x eval.position_loss_sequences), over "
            f"eval.max_tokens={e.max_tokens:,}: evaluate fewer lengths, depths, trials or sequences, or raise the bound")


# ---------------------------------------------------------------- precision (pipeline/training/precision.py)

PRECISIONS = ("auto", "fp32", "bf16-autocast", "bf16-mixed")


def check_precision(cfg: Config) -> None:
    """train.precision is one of PRECISIONS; under ZeRO, bf16 is DeepSpeed's bf16 mode (fp32 masters
    in its optimizer), so the plain steps' fp32-weights autocast has no ZeRO counterpart."""
    precision, zero_stage = cfg.train.precision, cfg.parallel.zero_stage
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: must be one of {', '.join(PRECISIONS)}")
    if zero_stage and precision == "bf16-autocast":
        raise ValueError(
            f"train.precision=bf16-autocast with parallel.zero_stage={zero_stage}: under ZeRO the bf16 step is "
            "DeepSpeed's bf16 mode (bf16 weights, fp32 master weights and gradients in its optimizer); set "
            "train.precision=bf16-mixed (or auto on a GPU) for it, or fp32")


# ---------------------------------------------------------------- micro-chunks (issue 14, docs/fam.md "Micro-chunks")

MICRO_CHUNK_MODES = ("exact", "truncated")


def micro_chunks_on(cfg: Config) -> bool:
    return bool(cfg.train.micro_chunk_len)


def micro_chunks_per_sample(cfg: Config) -> int:
    """Micro-chunks of one sample (1 without micro-chunks); the last may be shorter."""
    n = cfg.train.micro_chunk_len
    return -(-cfg.data.seq_len // n) if n and n > 0 else 1  # a bad length is check_micro_chunks' to name


def check_micro_chunks(cfg: Config) -> None:
    """train.micro_chunk_len / micro_chunk_mode against the model and the layout."""
    t, p, model = cfg.train, cfg.parallel, cfg.model
    if t.micro_chunk_mode not in MICRO_CHUNK_MODES:
        raise ValueError(f"train.micro_chunk_mode={t.micro_chunk_mode!r}: must be one of {MICRO_CHUNK_MODES}")
    n = t.micro_chunk_len
    if t.micro_chunk_offload_states and (not n or t.micro_chunk_mode != "exact"):
        raise ValueError(f"train.micro_chunk_offload_states=true needs exact micro-chunks (train.micro_chunk_len={n}, "
                         f"train.micro_chunk_mode={t.micro_chunk_mode!r}): only exact mode saves boundary states")
    if not n:
        return
    if model.attention == "dense":
        raise ValueError(f"train.micro_chunk_len={n} with model.attention='dense': dense attention has no O(1) state "
                         "to pass across micro-chunks (every token attends to every earlier one); set "
                         "train.micro_chunk_len=0, or use model.attention='fam'")
    if n < 0 or n % model.block_size:
        raise ValueError(f"train.micro_chunk_len={n} must be a positive multiple of model.block_size="
                         f"{model.block_size}: a micro-chunk may only end where a block ends")
    if p.pipeline_parallel_size > 1:
        _check_pipeline_micro_chunks(cfg)
    if p.zero_stage in (2, 3):
        raise ValueError(
            f"train.micro_chunk_len={n} with parallel.zero_stage={p.zero_stage}: a micro-chunked sample back-propagates "
            "once per micro-chunk, and DeepSpeed 0.19.8's ZeRO-2 reduces each parameter's gradient once per backward "
            "(stage_1_and_2.py asserts 'Multiple gradient reductions are currently not supported') while ZeRO-3 "
            "gathers parameters only inside the engine's forward; use parallel.zero_stage=1 (or 0)")
    if p.zero_offload_optimizer:
        raise ValueError(f"train.micro_chunk_len={n} with parallel.zero_offload_optimizer=true: micro-chunks are "
                         "back-propagated outside the engine and DeepSpeed's offload path reduces gradients inside its "
                         "own backward; turn one of them off")
    if p.sequence_parallel:
        last = cfg.data.seq_len - (micro_chunks_per_sample(cfg) - 1) * n
        for what, length in (("train.micro_chunk_len", n), ("the last micro-chunk of data.seq_len", last)):
            check_sequence_parallel_length(length, p.tensor_parallel_size, what)


def _check_pipeline_micro_chunks(cfg: Config) -> None:
    """With PP the micro-chunks are the schedule's micro-batches: truncated and equal (how many: check_parallel)."""
    t, p, n = cfg.train, cfg.parallel, cfg.train.micro_chunk_len
    if t.micro_chunk_mode == "exact":
        raise ValueError(
            f"train.micro_chunk_mode='exact' with parallel.pipeline_parallel_size={p.pipeline_parallel_size}: exact "
            "mode walks the micro-chunks backwards with each chunk's state gradient, which a pipeline schedule "
            "(micro-chunks as micro-batches, backwards interleaved with forwards) cannot hand between stages; use "
            "train.micro_chunk_mode=truncated with PP")
    if cfg.data.seq_len % n:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} is not a multiple of train.micro_chunk_len={n}: with "
                         "pipeline parallelism the micro-chunks are the schedule's micro-batches, which must be equal")
