"""Which keys a resumed run may change: RESUME_SAFE_KEYS and check_resume_config, the rule that
compares a checkpoint's saved config with this run's before any model is built
(pipeline/checkpointing/resume.py calls it).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config.load import to_yaml
from pipeline.config.tree import Config

# The keys a run may change when it resumes from its own checkpoint; any other difference from the
# checkpoint's config.yaml is refused (check_resume_config). A key is here when changing it alters
# neither the trained model's math nor the meaning of what was already logged; a trailing "." means
# the whole section. Not here, on purpose: every other model.* key, data.* (manifests, seq_len,
# batch sizes, seed and shuffle fix the sample order that the loader resumes in; eval_steps and
# valid_manifest what val_loss means), optim.* (a schedule changed midway is another run),
# train.seed/rpo/rsp_probability/precision/device (with precision=auto a GPU trains in bf16-mixed),
# parallel.zero_stage/zero_offload_optimizer/deepspeed_overrides (the optimizer state's format),
# parallel.sequence_parallel (the saved RSP state holds this rank's F/TP FAM rows under SP, all F
# without).
RESUME_SAFE_KEYS = (
    "model.recompute",  # recompute repeats the same forward: memory for time, same numbers
    "train.micro_chunk_offload_states",  # where exact mode's saved states wait: memory only, same numbers
    "data.verify_checksums",
    "train.steps",  # to train on (the cosine schedule stretches from the resumed step on) or stop earlier
    "train.run_dir",  # where outputs go: a run folder moved to another filesystem
    "train.log_interval_steps", "train.eval_interval_steps", "train.exit_after_steps", "train.max_wall_seconds",
    "train.max_nonfinite_steps", "train.record_sample_keys", "train.peak_tflops", "train.progress_bar",
    # TP and PP sizes and the pipeline layout: the plain and pipeline steps reshard the weights
    # (AdamW moments restart) without ZeRO and refuses, naming sizes and layout, where it cannot.
    "parallel.tensor_parallel_size", "parallel.pipeline_parallel_size", "parallel.virtual_stages",
    "parallel.pipeline_layout", "parallel.pipeline_schedule", "parallel.backend", "parallel.timeout_seconds",
    "checkpoint.",  # enabled, dir, save_interval_steps, keep_last, resume
    "tracking.",
    "eval.",  # what and when to evaluate: reads the model, never changes it (pipeline/evaluation/in_loop.py)
)


def is_resume_safe(key: str) -> bool:
    return key in RESUME_SAFE_KEYS or key.split(".", 1)[0] + "." in RESUME_SAFE_KEYS


def _flat(tree: dict) -> dict[str, object]:
    return {f"{s}.{k}": v for s, section in tree.items() if isinstance(section, dict) for k, v in section.items()}


def resume_config_changes(saved_yaml: str, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this run's value) of every key outside RESUME_SAFE_KEYS that
    differs. Both sides go through YAML, so types compare alike; a key the checkpoint's config
    lacks (written by an older famtron) is not compared."""
    saved, now = _flat(yaml.safe_load(saved_yaml) or {}), _flat(yaml.safe_load(to_yaml(cfg)))
    return [(key, saved[key], value) for key, value in now.items()
            if key in saved and saved[key] != value and not is_resume_safe(key)]


def check_resume_config(saved_yaml: str, cfg: Config, checkpoint: str | Path) -> None:
    """ValueError naming each key that differs from the checkpoint's config and may not (old -> new)."""
    changes = resume_config_changes(saved_yaml, cfg)
    if changes:
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
        raise ValueError(
            f"checkpoint {checkpoint} was trained with another config: {listed}. These keys cannot change when a run "
            "resumes (pipeline/config/resume.py RESUME_SAFE_KEYS lists those that can): give a new train.run_dir (or "
            "checkpoint.dir) to start another run with them, or set them back to resume this one"
        )
