"""Which checkpoint a run resumes from, decided before the model is built: the folder
(checkpoint.resume: auto, none or a path), its config against this run's, and every file's
safety (weights-only loading). What is read from it afterwards is the training step's business
(pipeline/training/step.py) and pipeline/checkpointing/shards.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpointing.files import (check_weights_only, find_latest_checkpoint, list_checkpoints, load_file,
                                          verify_checkpoint)
from pipeline.config.resume import check_resume_config
from pipeline.config.tree import CheckpointConfig, Config
from pipeline.parallel.collectives import broadcast_object
from pipeline.parallel.groups import ProcessGroups


@dataclass
class Resume:
    path: Path  # the step folder
    step: int  # its trainer step


def resolve_resume(cfg: Config, groups: ProcessGroups) -> Resume | None:
    """The checkpoint to start from, decided on rank 0 (one reader of the folder) and
    broadcast, so every rank loads the same step; errors are raised on every rank. Before any
    model is built: the checkpoint's config differs from this run's only in keys safe to change
    (pipeline/config/resume.py check_resume_config), and every file loads weights-only (check_files)."""
    choice: Resume | Exception | None = None
    if groups.is_rank0:
        try:
            path = choose_checkpoint(cfg.checkpoint)
            if path is not None:
                check_resume_config(load_file(path, "config.yaml"), cfg, path)
                check_files(path)
                choice = Resume(path, int(load_file(path, "trainer.pt")["step"]))
        except Exception as err:  # noqa: BLE001 - raised on every rank below, not only here
            choice = err
    choice = broadcast_object(choice)
    if isinstance(choice, Exception):
        raise choice
    return choice


def choose_checkpoint(cfg: CheckpointConfig) -> Path | None:
    """checkpoint.resume: auto -> the newest complete checkpoint (or None); none -> None, refusing
    a folder that already holds checkpoints; a path -> that folder, if complete."""
    if cfg.resume == "auto":
        return find_latest_checkpoint(cfg.dir)
    if cfg.resume == "none":
        existing = list_checkpoints(cfg.dir)
        if existing:  # mixing two runs' checkpoints in one folder would make `auto` pick either
            raise ValueError(
                f"checkpoint.resume=none but checkpoint.dir={cfg.dir} already holds {existing[-1][1].name}; "
                "use checkpoint.resume=auto, another checkpoint.dir, or delete the old checkpoints"
            )
        return None
    problem = verify_checkpoint(cfg.resume)
    if problem:
        raise ValueError(f"checkpoint.resume={cfg.resume}: {problem}")
    return Path(cfg.resume)


def check_files(path: Path) -> None:
    """Every .pt file of a step folder loads with torch.load(weights_only=True): famtron's own
    files with nothing beyond tensors and plain values, DeepSpeed's (`zero/`) with the few classes
    it stores. UnsafeCheckpointError names the first file that does not."""
    own = sorted(p for p in path.rglob("*.pt") if "zero" not in p.relative_to(path).parts[:-1])
    check_weights_only(own)
    if (path / "zero").is_dir():
        from pipeline.checkpointing.zero_files import check_zero_files

        check_zero_files(path / "zero")
