"""The shard manifest: the one file the training loader trusts.

Each split folder (`DIR/train/`, `DIR/valid/`) holds tar shards and `manifest.json`:

    {
      "format": "famtron-token-shards", "format_version": 1, "split": "train",
      "seq_len": L, "sample_len": L + 1, "dtype": "uint16",
      "tokenizer": {"spec", "name", "vocab_size", "eod_id", "sha256"},
      "shards": [{"name", "samples", "tokens", "bytes", "sha256"}, ...],
      "total_samples", "total_tokens", "documents", "dropped_tokens",
      "sources": [{"name", "size", "mtime_ns", "sha256"}, ...],
      "settings": {... the sharder's options ...},
      "created": "<UTC ISO time>"
    }

Shard names are relative to the manifest's folder. Every sample in a shard has a
`__key__` and `tokens.npy` (dtype above, shape [sample_len]).

The manifest is written last and atomically (temp file in the same folder, fsync,
`os.replace`), after every shard it lists was renamed into place, so a manifest never
names a partial shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

FORMAT = "famtron-token-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_REQUIRED_KEYS = ("seq_len", "sample_len", "dtype", "tokenizer", "shards", "total_samples")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_manifest(split: str, seq_len: int, dtype: str, tokenizer: dict, shards: list[dict],
                   documents: int, dropped_tokens: int, sources: list[dict], settings: dict) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "split": split,
        "seq_len": seq_len, "sample_len": seq_len + 1, "dtype": dtype,
        "tokenizer": tokenizer, "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_tokens": sum(s["tokens"] for s in shards),
        "documents": documents, "dropped_tokens": dropped_tokens,
        "sources": sources, "settings": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_manifest(path: str, manifest: dict) -> bool:
    """Write atomically unless an identical manifest (ignoring `created`) is already there.

    Keeping the old file on a no-op re-run makes re-running produce identical output.
    Returns whether the file was written.
    """
    if os.path.exists(path):
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and _without_created(old) == _without_created(manifest):
            return False
    write_json_atomic(path, manifest)
    return True


def _without_created(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "created"}


def load_manifest(path: str) -> dict:
    """Read and sanity-check a manifest; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest {path} does not exist: run `python -m data_prep.shard` "
                                "to create it (it lives in DIR/train/ and DIR/valid/)")
    try:
        manifest = read_json(path)
    except ValueError as e:
        raise ValueError(f"manifest {path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a famtron shard manifest (format != {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"manifest {path} has format_version {manifest.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}: re-run python -m data_prep.shard")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest {path} lacks keys {missing}")
    return manifest


def shard_path(manifest_path: str, shard: dict) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(manifest_path)), shard["name"])


def verify_shards(manifest_path: str, manifest: dict, checksums: bool = True) -> None:
    """Every listed shard exists with the recorded size (and sha256 if `checksums`)."""
    fix = ("re-run `python -m data_prep.shard` with the same options (it rewrites shards "
           "that are missing or changed) or restore the file")
    for shard in manifest["shards"]:
        path = shard_path(manifest_path, shard)
        if not os.path.isfile(path):
            raise ValueError(f"shard {path} listed in {manifest_path} is missing: {fix}")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise ValueError(f"shard {path} has {size} bytes, manifest {manifest_path} says "
                             f"{shard['bytes']}: it is corrupted or truncated; {fix}")
        if checksums and sha256_file(path) != shard["sha256"]:
            raise ValueError(f"shard {path} fails its sha256 check against {manifest_path}: "
                             f"it is corrupted; {fix}")
