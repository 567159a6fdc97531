"""Streaming document readers, one per input format.

Formats, by file name:
- `.txt` (and the stdlib's `.py`): the whole file is one document;
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one document per non-blank line, in field
  `text_field`; compressed files are decompressed as a stream (gzip from the standard
  library, zstd through pyarrow's codec, so no extra package is needed);
- `.parquet`: one document per row of column `text_field`, read a row group at a time;
- `.arrow`: Arrow IPC (stream or file format), one document per row of column
  `text_field`, read a record batch at a time from a memory map. This is how the
  files of a HF `datasets` folder written by `save_to_disk` are read (`corpus` finds
  them through the folder's `state.json`), without depending on the `datasets` package.

No reader holds a whole file in memory except `.txt`, whose file *is* one document.

Document ids (which decide the train/valid split, see `corpus.split_of`) are the source
name for a text file, `name:<line>` (1-based) for JSONL and `name:<row>` (0-based, as
in `datasets`/pandas indexing) for Parquet and Arrow. Null or empty texts are skipped.

Bad UTF-8 (a text file or JSONL line that does not decode, or a JSON string holding a
lone surrogate, which no tokenizer can encode) either fails with its location
(`on_bad_utf8="fail"`) or is skipped and counted in `BadText` (`"skip"`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

BAD_UTF8_POLICIES = ("fail", "skip")
TEXT_SUFFIXES = (".txt", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
INPUT_SUFFIXES = (".txt", *JSONL_SUFFIXES, *TABLE_SUFFIXES)
_READ_BUFFER = 1 << 20
_TABLE_BATCH_ROWS = 1024


@dataclass
class BadText:
    """Documents skipped for bad UTF-8: the count and the first few locations (for the log)."""

    count: int = 0
    locations: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.locations) < 20:
            self.locations.append(where)


class DocumentReader:
    """Iterates (doc_id, text) of one file; `bytes_read` tracks progress through the file.

    `digest`, if given, receives the file's bytes: for text and JSONL exactly the bytes
    that were read while tokenizing (no second pass); for Parquet and Arrow, whose
    readers seek, a separate sequential pass at the end.
    """

    def __init__(self, path: str, name: str, text_field: str = "text", digest=None,
                 on_bad_utf8: str = "fail", bad: BadText | None = None):
        if on_bad_utf8 not in BAD_UTF8_POLICIES:
            raise ValueError(f"--on-bad-utf8 must be one of {BAD_UTF8_POLICIES}, got {on_bad_utf8!r}")
        self.path, self.name, self.text_field = path, name, text_field
        self.digest = digest if digest is not None else hashlib.sha256()
        self.on_bad_utf8 = on_bad_utf8
        self.bad = bad if bad is not None else BadText()
        self.size = os.path.getsize(path)
        self.bytes_read = 0

    def __iter__(self) -> Iterator[tuple[str, str]]:
        if self.name.endswith(JSONL_SUFFIXES):
            yield from self._jsonl()
        elif self.name.endswith(".parquet"):
            yield from self._table(self._parquet_batches())
        elif self.name.endswith(".arrow"):
            yield from self._table(self._arrow_batches())
        else:
            yield from self._text()

    # -- text and JSONL: one sequential, hashed read --------------------------------------

    def _open(self) -> io.BufferedReader:
        raw = _HashingReader(open(self.path, "rb"), self.digest, self)
        if self.name.endswith(".gz"):
            return io.BufferedReader(gzip.GzipFile(fileobj=io.BufferedReader(raw, _READ_BUFFER)), _READ_BUFFER)
        if self.name.endswith(".zst"):
            import pyarrow as pa

            return io.BufferedReader(pa.CompressedInputStream(io.BufferedReader(raw, _READ_BUFFER), "zstd"),
                                     _READ_BUFFER)
        return io.BufferedReader(raw, _READ_BUFFER)

    def _text(self) -> Iterator[tuple[str, str]]:
        with self._open() as f:
            raw = f.read()
        text = self._decode(raw, lambda e: f"{self.path}: byte {e.start}")
        if text:
            yield self.name, text

    def _jsonl(self) -> Iterator[tuple[str, str]]:
        with self._open() as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines are allowed
                where = f"{self.path}:{lineno}"
                text = self._decode(line, lambda e: f"{where} (byte {e.start} of the line)")
                if text is None:
                    continue
                text = self._json_text(text, where, has_escapes=b"\\ud" in line or b"\\uD" in line)
                if text:
                    yield f"{self.name}:{lineno}", text

    def _json_text(self, line: str, where: str, has_escapes: bool) -> str | None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or self.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: no {self.text_field!r} field (found {keys}); "
                             "pass --text-field to name the text field")
        text = record[self.text_field]
        if text is None:
            return None
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {self.text_field!r} is {type(text).__name__}, not a string")
        if has_escapes:  # only a \uD800-\uDFFF escape can smuggle a lone surrogate in
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return self._bad(f"{where}: field {self.text_field!r} holds a lone surrogate at "
                                 f"character {e.start}")
        return text

    def _decode(self, raw: bytes, where) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._bad(f"{where(e)}: not valid UTF-8")

    def _bad(self, message: str) -> None:
        if self.on_bad_utf8 == "fail":
            raise ValueError(f"{message} (pass --on-bad-utf8 skip to skip and count such documents)")
        self.bad.add(message)
        return None

    # -- Parquet and Arrow: columnar batches ------------------------------------------------

    def _table(self, batches) -> Iterator[tuple[str, str]]:
        row = 0
        for column, fraction in batches:
            values = column.to_pylist()
            binary = _is_binary(column.type)
            for i, text in enumerate(values):
                if binary and text is not None:
                    text = self._decode(text, lambda e: f"{self.path} row {row + i} (byte {e.start})")
                if text:
                    yield f"{self.name}:{row + i}", text
            row += len(values)
            self.bytes_read = int(self.size * fraction)
        self._hash_whole_file()

    def _column(self, schema, where: str) -> None:
        if self.text_field not in schema.names:
            raise ValueError(f"{where}: no column {self.text_field!r} (found {schema.names}); "
                             "pass --text-field to name the text column")
        kind = schema.field(self.text_field).type
        if not (_is_string(kind) or _is_binary(kind)):
            raise ValueError(f"{where}: column {self.text_field!r} is {kind}, not a string column")

    def _parquet_batches(self):
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as pf:
            self._column(pf.schema_arrow, self.path)
            total = max(pf.metadata.num_rows, 1)
            done = 0
            for batch in pf.iter_batches(batch_size=_TABLE_BATCH_ROWS, columns=[self.text_field]):
                done += batch.num_rows
                yield batch.column(0), done / total

    def _arrow_batches(self):
        import pyarrow as pa

        with pa.memory_map(self.path) as source:
            try:
                reader = pa.ipc.open_stream(source)  # what `datasets` writes
                batches = iter(reader)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            self._column(reader.schema, self.path)
            for batch in batches:
                yield batch.column(self.text_field), source.tell() / max(self.size, 1)

    def _hash_whole_file(self) -> None:
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(_READ_BUFFER), b""):
                self.digest.update(block)
        self.bytes_read = self.size


def _is_string(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"


def _is_binary(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


class _HashingReader(io.RawIOBase):
    """A raw file whose every byte read also goes to `digest` and advances `owner.bytes_read`."""

    def __init__(self, f, digest, owner: DocumentReader):
        self._f, self._digest, self._owner = f, digest, owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        if n:
            self._digest.update(memoryview(buffer)[:n])
            self._owner.bytes_read += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()
