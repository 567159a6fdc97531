"""`python -m pipeline.import_hf`: a Hugging Face folder exported by famtron back as a training
checkpoint, to fine-tune it with pipeline.train.

    python -m pipeline.import_hf out/hf --output runs/ft --config configs/demo.yaml \
        --data.train_manifest=data/my-corpus/train/manifest.json [--section.key=value ...]
    python -m pipeline.train --config runs/ft/config.yaml        # resumes from runs/ft/step_00000000

The model section comes from the folder's config.json (only model.recompute may be set); every
other section from --config and the overrides, as for pipeline.train, with train.run_dir and
checkpoint.dir set to --output. The data must be named here: a checkpoint holds its loader's
position, which belongs to one manifest, and the manifest's tokenizer must be the folder's.
Written: OUTPUT/config.yaml and OUTPUT/step_00000000/, exactly the files a one-process run writes
at its start (the step's checkpoint_files, pipeline/training/: weights, a fresh AdamW, loader at the
first sample, RNG, trainer step 0, config; sha256 manifest last, atomically). It resumes with
checkpoint.resume=auto (or =OUTPUT/step_00000000) at DP=1, at any TP/PP size (resharded), without
ZeRO (a ZeRO run cannot resume from plain weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from data_prep.cli import run_main

PROG = "python -m pipeline.import_hf"
_SINGLE_PROCESS = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "virtual_stages": 1,
                   "pipeline_layout": None, "pipeline_schedule": "1f1b", "sequence_parallel": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="other arguments: --section.key=value overrides, as for pipeline.train")
    p.add_argument("hf_dir", help="a folder written by python -m pipeline.export_hf (or save_pretrained after it)")
    p.add_argument("--output", required=True, help="new folder: the checkpoint folder and run folder of the fine-tune")
    p.add_argument("--config", default=None, help="training config YAML or name; its model section is replaced")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return p


def build_config(hf_args, config: str | None, overrides: list[str], output: Path):
    """The fine-tune's config: --config and overrides, the folder's model, run and checkpoint folder = output."""
    from pipeline.config.load import load_config

    bad = [o for o in overrides if o.startswith("--model.") and not o.startswith("--model.recompute")]
    if bad:
        raise ValueError(f"{bad[0]}: the model comes from the Hugging Face folder's config.json; only model.recompute "
                         "may be set")
    run_dir = [] if any(o.startswith("--train.run_dir") for o in overrides) else [f"--train.run_dir={output}"]
    cfg = load_config(config, overrides + run_dir + [f"--checkpoint.dir={output}"])
    cfg.model = dataclasses.replace(hf_args, recompute=cfg.model.recompute)
    if not (cfg.data.train_manifest or cfg.data.train_blend):
        raise ValueError("no training data: give --data.train_manifest=MANIFEST (or data.train_blend in --config); "
                         "the checkpoint records its loader's position in that data")
    if cfg.parallel.zero_stage:
        raise ValueError(f"parallel.zero_stage={cfg.parallel.zero_stage}: a ZeRO run cannot resume from plain "
                         "weights; import with parallel.zero_stage=0")
    return cfg


def check_same_tokenizer(cfg, spec: str, hf_dir: Path) -> None:
    """The training manifests' tokenizer is the folder's (same vocabulary file, same end of document)."""
    from data_prep.manifest import load_manifest
    from data_prep.tokenizer import load_tokenizer

    mine = load_tokenizer(spec).describe()
    keys = ("vocab_size", "eod_id", "sha256")
    for manifest in cfg.data.train_blend or [cfg.data.train_manifest]:
        if not Path(manifest).is_file():
            raise FileNotFoundError(f"data.train_manifest={manifest}: no such file")
        theirs = load_manifest(manifest)["tokenizer"]
        if any(theirs.get(k) != mine[k] for k in keys):
            saw, has = (", ".join(f"{k} {d.get(k)}" for k in keys) for d in (theirs, mine))
            raise ValueError(f"{manifest} was tokenized with {theirs.get('spec')!r} ({saw}), but {hf_dir} ships "
                             f"{spec!r} ({has}); shard the data with --tokenizer {spec}")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv, prog=PROG)


def _main(argv: list[str]) -> Path:
    args, overrides = build_parser().parse_known_args(argv)
    output, hf_dir = Path(args.output), Path(args.hf_dir)
    if output.exists():
        raise FileExistsError(f"--output {output}: already exists; give a new folder for the imported checkpoint")
    from pipeline.hf.folder import import_hf

    back = import_hf(hf_dir)
    cfg = build_config(back.args, args.config, overrides, output)
    check_same_tokenizer(cfg, back.tokenizer, hf_dir)
    path = write_checkpoint(cfg, back.state, source=str(hf_dir))
    print(f"imported {hf_dir} as {path}; fine-tune with: python -m pipeline.train --config {output / 'config.yaml'}")
    return path


def write_checkpoint(cfg, state: dict, source: str) -> Path:
    """checkpoint.dir/step_00000000 as a one-process run writes it, holding `state`; config.yaml beside it."""
    import torch.distributed as dist

    from pipeline.checkpointing.files import save_checkpoint
    from pipeline.checkpointing.shards import run_files
    from pipeline.config.load import save_config, to_yaml
    from pipeline.parallel.groups import start_groups, stop_groups
    from pipeline.training.trainer import build_trainer

    owns_groups = not dist.is_initialized()  # as pipeline.train.run: leave a caller's groups alone
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **_SINGLE_PROCESS),
                              train=dataclasses.replace(cfg.train, device="cpu"))
    try:
        groups = start_groups(device="cpu")
        tr = build_trainer(one, groups)
        tr.strategy.load_weights(state)
        trainer = {"step": 0, "mlflow_run_id": None, "pipeline_chunks": tr.strategy.chunks, "eval": None,
                   "imported_from": source}
        files = {**run_files(groups, tr.loader, trainer, to_yaml(cfg)), **tr.strategy.checkpoint_files()}
        path = save_checkpoint(cfg.checkpoint.dir, 0, files, cfg.checkpoint.keep_last)
    finally:
        if owns_groups:
            stop_groups()
    save_config(cfg, Path(cfg.checkpoint.dir) / "config.yaml")
    return path


if __name__ == "__main__":
    sys.exit(main())
