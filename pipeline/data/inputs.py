"""What a training run reads: its manifests, checked before any process group exists to hang on,
and the loaders built from the config's data section for this data-parallel rank."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.tree import Config, DataConfig
from pipeline.data.loader import ShardLoader, build_valid_loader, manifest_info


def check_inputs(cfg: Config) -> None:
    """The manifests exist, hold samples of data.seq_len and a vocabulary that fits the model's."""
    named = [("train_manifest", cfg.data.train_manifest), ("valid_manifest", cfg.data.valid_manifest)]
    if cfg.data.train_blend:
        named = [(f"train_blend[{i}]", path) for i, path in enumerate(cfg.data.train_blend)] + named[1:]
    for key, path in named:
        if not path:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"data.{key}={path}: no such file. Build shards first, e.g. python -m data_prep.shard "
                f"--input stdlib --tokenizer byte --seq-len {cfg.data.seq_len} --output data/stdlib-byte-{cfg.data.seq_len}"
            )
        info = manifest_info(path)
        if info["seq_len"] != cfg.data.seq_len:  # else the loader finds out after the model is built
            raise ValueError(f"data.{key}={path} was sharded with seq_len={info['seq_len']} but data.seq_len="
                             f"{cfg.data.seq_len}; set data.seq_len={info['seq_len']}, or re-shard with --seq-len "
                             f"{cfg.data.seq_len}")
        vocab = info["vocab_size"]
        if vocab > cfg.model.vocab_size:  # token ids past the embedding fail deep inside megatron otherwise
            raise ValueError(f"data.{key}={path} holds token ids up to {vocab - 1} but model.vocab_size="
                             f"{cfg.model.vocab_size}; set model.vocab_size >= {vocab}")


def build_loaders(d: DataConfig, dp_rank: int, dp_size: int):
    """(training loader: one manifest, or a blend of several; validation loader or None)."""
    if d.train_blend:  # several manifests mixed in proportion (pipeline/data/blend.py)
        from pipeline.data.blend import BlendLoader

        loader = BlendLoader(d.train_blend, d.train_blend_weights, d.micro_batch_size, d.seq_len, dp_rank=dp_rank,
                             dp_world_size=dp_size, seed=d.seed, shuffle=d.shuffle,
                             verify_checksums=d.verify_checksums)
    else:
        loader = ShardLoader(d.train_manifest, d.micro_batch_size, d.seq_len, dp_rank=dp_rank,
                             dp_world_size=dp_size, seed=d.seed, shuffle=d.shuffle,
                             verify_checksums=d.verify_checksums)
    valid_loader = None
    if d.valid_manifest:
        valid_loader = build_valid_loader(d.valid_manifest, d.micro_batch_size, d.seq_len, dp_rank, dp_size,
                                          verify_checksums=d.verify_checksums)
    return loader, valid_loader
