"""The shard manifest: the one file the training loader trusts.

Each split folder (`DIR/train/`, `DIR/valid/`) holds tar shards and `manifest.json`:

    {
      "format": "famtron-token-shards", "format_version": 1, "split": "train",
      "seq_len": L, "sample_len": L + 1, "dtype": "uint16",
      "tokenizer": {"spec", "name", "vocab_size", "eod_id", "sha256"},
      "shards": [{"name", "samples", "tokens", "bytes", "sha256"}, ...],
      "total_samples", "total_tokens", "documents", "dropped_tokens",
      "skipped_documents": {"bad_utf8": n, "bad_json": m},   # this split's skips only
      "doc_lengths": {"name": "doc_lengths.npy", "count", "bytes", "sha256"},
      "sources": [{"name", "size", "mtime_ns", "sha256", "group"}, ...],
      "settings": {... the sharder's options ...}
    }

Shard names are relative to the manifest's folder. Every sample in a shard has a
`__key__` and `tokens.npy` (dtype above, shape [sample_len]). `doc_lengths.npy` is a
uint32 array of every document's token count (without EOD), in corpus order: samples
are packed, so document lengths cannot be recovered from the shards (`data_prep.stats`).
A source's `group` is the pack group whose shards it fed (`data_prep.validate --repair`).

The manifest holds no wall-clock time: it is a pure function of the input files and the
options, so the same data gives the same manifest bytes (its sha256 names the dataset),
and a resumed or parallel run can be compared byte for byte with a plain one.

The manifest is written last and atomically (temp file in the same folder, fsync,
`os.replace`), after every shard it lists was renamed into place, so a manifest never
names a partial shard.
"""

from __future__ import annotations

import hashlib
import json
import os

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


def write_json_atomic(path: str, obj, sort_keys: bool = True) -> None:
    """Write JSON so that readers see either the old file or the complete new one (keys sorted unless
    `sort_keys` is False: benchmark rows keep their own order, config first)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=sort_keys)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def write_lengths(path: str, parts, count: int) -> dict:
    """Write the uint32 arrays `parts` (`count` values in all) as one .npy, atomically, streamed.

    Returns {"name", "count", "bytes", "sha256"}. Streaming keeps merge memory at one
    group's lengths, not the corpus's. An identical existing file is left alone (as
    `write_manifest` does), so a no-op re-run rewrites nothing.
    """
    import io

    import numpy as np

    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp.{os.getpid()}")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u4", "fortran_order": False, "shape": (count,)})
    digest, size = hashlib.sha256(header.getvalue()), len(header.getvalue())
    with open(tmp, "wb") as f:
        f.write(header.getvalue())
        for part in parts:
            data = np.asarray(part, dtype="<u4").tobytes()
            f.write(data)
            digest.update(data)
            size += len(data)
        f.flush()
        os.fsync(f.fileno())
    if size != len(header.getvalue()) + 4 * count:
        os.remove(tmp)
        raise ValueError(f"{path}: the length arrays hold {(size - len(header.getvalue())) // 4} values, "
                         f"expected {count}")
    record = {"name": name, "count": count, "bytes": size, "sha256": digest.hexdigest()}
    if os.path.isfile(path) and os.path.getsize(path) == size and sha256_file(path) == record["sha256"]:
        os.remove(tmp)
    else:
        os.replace(tmp, path)
        fsync_dir(folder)
    return record


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# shape: one keyword per manifest field, filled by data_prep/shard.py in one place
def build_manifest(split: str, seq_len: int, dtype: str, tokenizer: dict, shards: list[dict],
                   documents: int, dropped_tokens: int, sources: list[dict], settings: dict,
                   doc_lengths: dict, skipped_documents: dict) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "split": split,
        "seq_len": seq_len, "sample_len": seq_len + 1, "dtype": dtype,
        "tokenizer": tokenizer, "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_tokens": sum(s["tokens"] for s in shards),
        "documents": documents, "dropped_tokens": dropped_tokens,
        "sources": sources, "settings": settings,
        "doc_lengths": doc_lengths, "skipped_documents": skipped_documents,
    }


def write_manifest(path: str, manifest: dict) -> bool:
    """Write atomically unless an identical manifest is already there.

    Keeping the old file on a no-op re-run leaves its mtime alone. Returns whether the
    file was written.
    """
    if os.path.exists(path):
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = None
        if old == manifest:
            return False
    write_json_atomic(path, manifest)
    return True


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
