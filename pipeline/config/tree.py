"""The training config tree: one typed dataclass per section, each field with its default and
help line (`python -m pipeline.train --help` prints them).

Sections: `model` (model.config.ModelArgs), `data`, `optim`, `train`, `parallel`, `checkpoint`,
`tracking`, `eval` (evaluation during training, pipeline/evaluation/). Loading (defaults <- YAML <- CLI) is pipeline/config/load.py; the rules that span
keys are pipeline/config/rules.py; which keys a resumed run may change, pipeline/config/resume.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from model.config import ModelArgs


def _f(default: Any, help: str) -> Any:
    """A field with a help line (shown by `python -m pipeline.train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    train_manifest: str = _f("", "manifest.json of the training shards (python -m data_prep.shard)")
    train_blend: list[str] | None = _f(None, "several training manifests mixed by train_blend_weights (replaces train_manifest)")
    train_blend_weights: list[float] | None = _f(None, "one weight per train_blend manifest; normalised, e.g. [0.7, 0.3]")
    valid_manifest: str | None = _f(None, "manifest.json of the validation shards; null: no validation")
    seq_len: int = _f(512, "tokens per sample fed to the model (the shards hold seq_len + 1)")
    micro_batch_size: int = _f(4, "samples per forward/backward on one data-parallel rank")
    global_batch_size: int = _f(8, "samples per optimizer step over all ranks; accumulation = global / (micro x dp)")
    seed: int = _f(1234, "shuffle seed of the loader")
    shuffle: bool = _f(True, "shuffle samples each epoch")
    verify_checksums: bool = _f(True, "check shard sha256 against the manifest when opening")


@dataclass
class OptimConfig:
    lr: float = _f(3e-4, "peak learning rate, reached after warmup_steps")
    min_lr: float = _f(3e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay; never applied to norms, biases, the FAM prompt")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas [beta1, beta2]")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "global gradient-norm clip; 0 disables (always explicit)")
    warmup_steps: int = _f(100, "linear warmup from 0 to lr over this many steps")
    schedule: str = _f("cosine", "decay after warmup; only 'cosine' (to min_lr at train.steps)")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps of the whole run (the LR schedule's length)")
    run_dir: str = _f("runs/default", "folder for the resolved config, summary, loss curve and (by default) checkpoints")
    log_interval_steps: int = _f(10, "steps between console/MLflow metric lines (metrics are interval means)")
    eval_interval_steps: int = _f(100, "steps between validation passes; 0: only at the end")
    eval_steps: int = _f(10, "validation batches of data.global_batch_size samples per pass (fewer if the split is smaller)")
    exit_after_steps: int | None = _f(None, "stop (with a checkpoint) after this many steps in this process, for time-limited jobs")
    max_wall_seconds: float | None = _f(None, "stop (with a checkpoint) before this many seconds of training loop would pass")
    max_nonfinite_steps: int = _f(3, "skip up to this many NaN/inf steps in a row (no update); one more stops the run")
    record_sample_keys: str | None = _f(None, "folder: each rank appends the sample keys of every step (resume/data audits)")
    seed: int = _f(1234, "seed of weights init and of the per-step RPO/RSP draws")
    rpo: bool = _f(True, "random position offset (docs/fam.md, RPO and RSP): offset ~ U[0, 2*pi*rope_base), zero w.p. 0.5")
    rsp_probability: float = _f(0.8, "random state passing: probability a step starts from the saved FAM (paper: 0.8)")
    device: str = _f("auto", "auto | cpu | cuda")
    precision: str = _f("auto", "auto (bf16-mixed on GPU, fp32 on CPU) | fp32 | bf16-autocast (fp32 weights, "
                               "bf16 autocast) | bf16-mixed (bf16 weights, fp32 master weights, grads and AdamW; "
                               "under ZeRO: DeepSpeed's bf16): pipeline/training/precision.py")
    peak_tflops: float | None = _f(None, "peak dense TFLOP/s per device for MFU; null: by GPU name, n/a on CPU")
    progress_bar: bool = _f(True, "tqdm bar on rank 0")
    # Long sequences in micro-chunks (issue 14; docs/fam.md, "Micro-chunks"; rules: pipeline/config/rules.py
    # check_micro_chunks).
    micro_chunk_len: int | None = _f(None, "tokens per micro-chunk of each sample (a multiple of model.block_size); "
                                           "0/null: one call per sample")
    micro_chunk_mode: str = _f("exact", "exact (the whole call's gradients; saved boundary states, one recompute) | "
                                        "truncated (no gradient across a micro-chunk boundary; needed with PP)")
    micro_chunk_offload_states: bool = _f(False, "exact mode: keep the saved boundary states in (pinned) host memory, "
                                                 "not on the GPU (fam-1b: 347 MB per boundary at micro-batch 1)")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = _f(1, "TP degree (megatron-core); data parallel = world / (TP x PP)")
    pipeline_parallel_size: int = _f(1, "PP degree (torch.distributed.pipelining on megatron's PP group)")
    virtual_stages: int = _f(1, "pipeline chunks per rank; > 1 needs pipeline_schedule=interleaved_1f1b")
    pipeline_layout: list[int] | None = _f(None, "layers per pipeline chunk, e.g. [3, 2]; null: an even split")
    pipeline_schedule: str = _f("1f1b", "1f1b | interleaved_1f1b | gpipe")
    sequence_parallel: bool = _f(False, "megatron sequence parallelism inside the TP group (needs TP > 1)")
    zero_stage: int = _f(0, "0: plain data-parallel all-reduce; 1/2/3: DeepSpeed ZeRO (only 1 with PP > 1)")
    zero_offload_optimizer: bool = _f(False, "ZeRO-Offload: optimizer state and step on the CPU (zero_stage >= 1)")
    deepspeed_overrides: dict | None = _f(None, "extra DeepSpeed JSON keys, deep-merged (batch, clip, stage and "
                                                "dtype keys are derived from this config)")
    backend: str = _f("auto", "auto (nccl on GPU, gloo on CPU) | gloo | nccl")
    timeout_seconds: float = _f(600.0, "collective timeout under torchrun: a hung or dead peer raises instead of blocking")


@dataclass
class CheckpointConfig:
    enabled: bool = _f(True, "write checkpoints; false: none at all, not even at the end (speed or memory probes)")
    dir: str | None = _f(None, "checkpoint folder; null: <train.run_dir>/checkpoints")
    save_interval_steps: int = _f(100, "steps between checkpoints (one more at the end); 0: only at the end")
    keep_last: int = _f(3, "complete checkpoints to keep; older ones are deleted after a successful save")
    resume: str = _f("auto", "auto (newest complete checkpoint in dir, if any) | none | <path to a step_XXXXXXXX folder>")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "log params, metrics and artifacts to MLflow from rank 0")
    experiment: str = _f("famtron", "MLflow experiment name")
    run_name: str | None = _f(None, "MLflow run name; null: the name of train.run_dir")
    tracking_uri: str | None = _f(None, "null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    flush_interval_steps: int = _f(50, "send buffered metrics with log_batch every this many steps (and at the end)")


@dataclass
class EvalConfig:
    enabled: bool = _f(False, "evaluate during training (PassKey, loss by position): pipeline/evaluation/in_loop.py")
    interval_steps: int = _f(0, "steps between evaluations; 0: only at the end (train.steps); each one checkpoints")
    at_stop: bool = _f(False, "also evaluate where a run stops early (max_wall_seconds, a signal)")
    tokenizer: str | None = _f(None, "tokenizer spec of the PassKey prompts; null: the training manifest's")
    passkey_lengths: list[int] = _f([], "PassKey prompt lengths in tokens; []: no PassKey")
    passkey_depths: list[float] = _f([0.0, 0.5, 1.0], "key depth fractions in [0, 1]; 0: the paper's key-first prompt")
    passkey_trials: int = _f(8, "prompts (random keys) per length and depth")
    passkey_batch_size: int = _f(8, "prompts generated together")
    passkey_seed: int = _f(0, "seed of the keys: every evaluation asks for the same keys")
    position_loss_manifest: str | None = _f(None, "held-out manifest.json for loss by position; null: none")
    position_loss_length: int = _f(4096, "tokens per loss-by-position sequence")
    position_loss_sequences: int = _f(2, "held-out sequences averaged")
    position_loss_buckets: int = _f(16, "log-spaced position buckets (at most)")
    chunk_tokens: int = _f(1024, "tokens per forward call while streaming (a multiple of model.block_size)")
    max_tokens: int = _f(4_000_000, "cost bound: tokens one evaluation streams (PassKey prompts + sequences)")


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
