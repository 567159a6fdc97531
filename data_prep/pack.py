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

The tar is assembled here rather than through webdataset's TarWriter (it is the same
bytes: ustar headers from `tarfile`, owner `bigdata`, mode 0444, as TarWriter writes them):
the npy header is built once per shard and each sample is header + row bytes, and the
sha256 is taken from the bytes in memory instead of re-reading the file. Writing had cost
a third of the byte-tokenizer run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Callable

import numpy as np

from data_prep.manifest import fsync_dir, sha256_file

# A fixed mtime makes the tar bytes reproducible. It must be an int: tarfile writes a
# float mtime as an extra PAX header per member, 1 KiB more per sample (webdataset's
# default time.time() does this too).
_FIXED_MTIME = 0
_TAR_OWNER, _TAR_MODE = "bigdata", 0o444  # webdataset TarWriter's defaults
_BLOCK, _RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


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
        return self.add_stream(np.concatenate([ids.astype(self.dtype, copy=False), self._eod]))

    def add_stream(self, stream: np.ndarray) -> np.ndarray:
        """Add documents already followed by their EODs; return the samples completed."""
        self._pending.append(stream.astype(self.dtype, copy=False))
        self.buffered += len(stream)
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


def shard_bytes(keys: list[str], rows: np.ndarray) -> bytes:
    """The tar file of samples `rows` [n, sample_len] named `keys`."""
    npy = io.BytesIO()
    np.lib.format.write_array(npy, rows[:1].reshape(-1) if len(rows) else rows.reshape(-1))
    npy_header = npy.getvalue()[: -rows.shape[1] * rows.itemsize] if len(rows) else b""
    size = len(npy_header) + rows.shape[1] * rows.itemsize
    padding = b"\0" * (-size % _BLOCK)
    data = np.ascontiguousarray(rows).tobytes()
    row_bytes = rows.shape[1] * rows.itemsize
    parts, template = [], None
    for i, key in enumerate(keys):
        name = f"{key}.tokens.npy".encode("ascii")
        if template is None or len(name) != len(template[1]):
            template = _tar_header(name, size)
        parts += [_retitled(template, name), npy_header, data[i * row_bytes:(i + 1) * row_bytes], padding]
    body = sum(map(len, parts)) + 2 * _BLOCK  # the end-of-archive marker
    parts.append(b"\0" * (2 * _BLOCK + -body % _RECORD))
    return b"".join(parts)


def _tar_header(name: bytes, size: int) -> tuple[bytes, bytes, int]:
    """(header block, its name, its checksum) as `tarfile` writes it for one sample."""
    info = tarfile.TarInfo(name.decode("ascii"))
    info.size, info.mtime, info.mode = size, _FIXED_MTIME, _TAR_MODE
    info.uname = info.gname = _TAR_OWNER
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if len(header) != _BLOCK:  # a long name needs extra PAX blocks: no template
        return header, name, -1
    return header, name, int(header[148:154], 8)


def _retitled(template: tuple[bytes, bytes, int], name: bytes) -> bytes:
    """The template header with another name of the same length (why: tobuf is ~30 us).

    The ustar checksum is the byte sum of the block with its checksum field read as
    spaces, so changing the name changes it by the difference of the name byte sums.
    """
    header, old, checksum = template
    if name == old:
        return header
    if checksum < 0:
        return _tar_header(name, int(header[124:135], 8))[0]
    checksum += sum(name) - sum(old)
    return b"".join([name, header[len(name):148], b"%06o\0" % checksum, header[155:]])


def write_shard(path: str, keys: list[str], rows: np.ndarray) -> dict:
    """Write samples to `path` atomically; return its manifest record."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    data = shard_bytes(keys, rows)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    record = {"name": name, "samples": int(rows.shape[0]), "tokens": int(rows.size),
              "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
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

    `writer`, a single-thread executor shared by all sinks of a run, takes the file work
    (checking, writing, fsyncing; fsync alone was a third of a small run's wall time) off
    the packing thread. One thread keeps shards and progress-log lines in order; `close`
    waits for this sink's shards, so a group's record is written only after they are durable.
    A sink that is not `enabled` only counts (repairing one split re-packs both).
    """

    def __init__(self, folder: str, split: str, group: int, samples_per_shard: int,
                 done: dict[str, dict], on_shard: Callable[[dict], None], writer=None,
                 enabled: bool = True):
        self.folder, self.split, self.group = folder, split, group
        self.samples_per_shard = samples_per_shard
        self.done, self.on_shard, self.writer = done, on_shard, writer
        self.enabled = enabled
        self.shards: list[dict] = []
        self._pending: list = []
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
        """Write the last, partly filled shard and wait until every shard is on disk."""
        if self._count:
            self._flush(np.concatenate(self._rows))
        self._rows, self._count = [], 0
        self.shards = [p.result() if hasattr(p, "result") else p for p in self._pending]

    def _flush(self, rows: np.ndarray) -> None:
        index = len(self._pending)
        if not self.enabled:
            self._pending.append({"name": shard_name(self.split, self.group, index), "samples": len(rows)})
        elif self.writer is None:
            self._pending.append(self._store(index, rows))
        else:
            self._pending.append(self.writer.submit(self._store, index, rows))

    def _store(self, index: int, rows: np.ndarray) -> dict:
        name = shard_name(self.split, self.group, index)
        path = os.path.join(self.folder, name)
        record = self.done.get(name)
        if record is None or record["samples"] != len(rows) or not shard_intact(path, record):
            keys = [sample_key(self.split, self.group, index, r) for r in range(len(rows))]
            record = write_shard(path, keys, rows)
        self.on_shard(record)
        return record


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


def samples_for_megabytes(megabytes: float, sample_len: int, dtype: np.dtype) -> int:
    """Whole samples per shard so that a shard is at most `megabytes` MiB (at least one sample)."""
    if megabytes <= 0:
        raise ValueError(f"--shard-size-mb must be positive, got {megabytes}")
    npy = io.BytesIO()
    np.lib.format.write_array(npy, np.zeros(sample_len, dtype=dtype))
    per_sample = _BLOCK + -(-len(npy.getvalue()) // _BLOCK) * _BLOCK  # tar header + padded npy
    # A tar ends with two zero blocks and is padded to whole records.
    budget = int(megabytes * (1 << 20)) // _RECORD * _RECORD - 2 * _BLOCK
    return max(1, budget // per_sample)
