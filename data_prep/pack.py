"""Packing token streams into fixed-length samples and writing them as tar shards.

Packing (TransformerFAM paper, as in its pretraining setup): documents are tokenized,
each followed by EOD, and concatenated into one stream per split and pack group; the
stream is cut into samples of exactly `seq_len + 1` tokens (inputs and shifted labels
both come from one sample). Samples cross document boundaries with no masking. The
stream's final remainder, shorter than one sample, is dropped and counted.

Shards: `<split>-g<group>-<shard>.tar`, each sample `{"__key__": "<split>-g<group>-<shard>-<idx>",
"tokens.npy": array[seq_len + 1]}`. Keys contain no dot (webdataset splits a member name at
its first dot). A shard is written to a hidden temp name, fsynced, and renamed into place,
so a complete-looking name is always a complete shard. Tar headers use a fixed mtime, user
and group, so the same samples always give the same bytes and sha256.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import webdataset as wds

from data_prep.manifest import fsync_dir, sha256_file

# A fixed mtime makes the tar bytes reproducible (the manifest carries the creation time).
# It must be an int: tarfile writes a float mtime as an extra PAX header per member,
# 1 KiB more per sample (webdataset's default time.time() does this too).
_FIXED_MTIME = 0


class Packer:
    """Concatenates documents (+EOD) and cuts the stream into [k, sample_len] blocks."""

    def __init__(self, sample_len: int, eod_id: int, dtype: np.dtype):
        self.sample_len = sample_len
        self.dtype = dtype
        self._eod = np.array([eod_id], dtype=dtype)
        self._pending: list[np.ndarray] = []
        self.buffered = 0  # tokens waiting for the next sample; dropped if the stream ends

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Add one document; return the samples it completed (possibly none)."""
        self._pending += [ids.astype(self.dtype, copy=False), self._eod]
        self.buffered += len(ids) + 1
        if self.buffered < self.sample_len:
            return np.empty((0, self.sample_len), dtype=self.dtype)
        stream = np.concatenate(self._pending)
        count = len(stream) // self.sample_len
        rest = stream[count * self.sample_len:]
        self._pending, self.buffered = [rest], len(rest)
        return stream[: count * self.sample_len].reshape(count, self.sample_len)


def shard_name(split: str, group: int, index: int) -> str:
    return f"{split}-g{group:06d}-{index:06d}.tar"


def sample_key(split: str, group: int, index: int, row: int) -> str:
    return f"{split}-g{group:06d}-{index:06d}-{row:06d}"


def write_shard(path: str, keys: list[str], rows: np.ndarray) -> dict:
    """Write samples to `path` atomically; return its manifest record."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, mtime=_FIXED_MTIME) as writer:
            for key, row in zip(keys, rows):
                writer.write({"__key__": key, "tokens.npy": row})
        f.flush()
        os.fsync(f.fileno())
    record = {"name": name, "samples": int(rows.shape[0]), "tokens": int(rows.size),
              "bytes": os.path.getsize(tmp), "sha256": sha256_file(tmp)}
    os.replace(tmp, path)
    fsync_dir(folder)
    return record


def shard_intact(path: str, record: dict) -> bool:
    """The shard at `path` is exactly the one `record` describes (size, then sha256)."""
    return (os.path.isfile(path) and os.path.getsize(path) == record["bytes"]
            and sha256_file(path) == record["sha256"])


class ShardSink:
    """Collects samples of one (split, group) and writes them `samples_per_shard` at a time.

    `done` maps shard names to records from an interrupted earlier run of this group;
    such a shard is not rewritten when it is still intact (the samples are the same,
    because packing is deterministic). `on_shard` is called with each finished record,
    which is how the group's progress file learns about it.
    """

    def __init__(self, folder: str, split: str, group: int, samples_per_shard: int,
                 done: dict[str, dict], on_shard: Callable[[dict], None]):
        self.folder, self.split, self.group = folder, split, group
        self.samples_per_shard = samples_per_shard
        self.done, self.on_shard = done, on_shard
        self.shards: list[dict] = []
        self._rows: list[np.ndarray] = []
        self._count = 0

    def add(self, samples: np.ndarray) -> None:
        if len(samples):
            self._rows.append(samples)
            self._count += len(samples)
        while self._count >= self.samples_per_shard:
            rows = np.concatenate(self._rows)
            self._flush(rows[: self.samples_per_shard])
            rest = rows[self.samples_per_shard:]
            self._rows, self._count = [rest], len(rest)

    def close(self) -> None:
        """Write the last, partly filled shard."""
        if self._count:
            self._flush(np.concatenate(self._rows))
        self._rows, self._count = [], 0

    def _flush(self, rows: np.ndarray) -> None:
        index = len(self.shards)
        name = shard_name(self.split, self.group, index)
        path = os.path.join(self.folder, name)
        record = self.done.get(name)
        if record is None or record["samples"] != len(rows) or not shard_intact(path, record):
            keys = [sample_key(self.split, self.group, index, r) for r in range(len(rows))]
            record = write_shard(path, keys, rows)
        self.shards.append(record)
        self.on_shard(record)


class ProgressLog:
    """Append-only, fsynced record of the shards finished so far in one group."""

    def __init__(self, path: str, header: dict):
        self.path, self.header = path, header

    def load(self) -> dict[str, dict]:
        """Shard records of an earlier run with the same header, by shard name."""
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):
            return {}  # absent, or torn by a crash mid-write: just redo the group
        if not lines or lines[0] != self.header:
            return {}
        return {r["name"]: r for r in lines[1:]}

    def start(self, done: dict[str, dict]) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            for record in [self.header, *done.values()]:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
