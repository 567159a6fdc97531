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

Bad documents either fail with their location (policy "error") or are skipped and
counted in `BadDocuments`, in the split the document would have gone to (policy "skip"):
- bad UTF-8 (`on_bad_utf8`): a text file or JSONL line that does not decode, a binary
  Parquet/Arrow value that does not, or a JSON string holding a lone surrogate, which no
  tokenizer can encode;
- bad JSON (`on_bad_json`): a JSONL line that does not parse, or is not a JSON object.
  A record without the text field stays an error: that is a wrong --text-field, not a
  bad line, and skipping it would skip every line.

A file that cannot be read at all (a truncated or corrupt `.gz`/`.zst` stream, a file
that is not Parquet or Arrow, an I/O error) raises `BadInput` naming the file, the last
line or row read and how far into the file reading got: one line, no library traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

BAD_INPUT_POLICIES = ("error", "skip")
SKIP_KINDS = ("bad_utf8", "bad_json")
TEXT_SUFFIXES = (".txt", ".py")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
INPUT_SUFFIXES = (".txt", *JSONL_SUFFIXES, *TABLE_SUFFIXES)
_FORMATS = ((".gz", "gzip-compressed JSONL"), (".zst", "zstd-compressed JSONL"), (".jsonl", "JSONL"),
            (".parquet", "Parquet"), (".arrow", "Arrow IPC"))
_READ_BUFFER = 1 << 20
_TABLE_BATCH_ROWS = 1024


class BadInput(ValueError):
    """An input file or document that cannot be used; the message names the file and where."""


@dataclass
class BadDocuments:
    """What to do with a bad document, per kind ('error': raise naming it; 'skip': count it).

    Skips are counted per split and kind: `split_of(doc_id)` is the split the document
    would have gone to, so each skip lands in that split's manifest only. The first few
    locations are kept for the log.
    """

    on_bad_utf8: str = "error"
    on_bad_json: str = "error"
    split_of: Callable[[str], str] = lambda doc_id: "train"
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    locations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for flag, policy in (("--on-bad-utf8", self.on_bad_utf8), ("--on-bad-json", self.on_bad_json)):
            if policy not in BAD_INPUT_POLICIES:
                raise ValueError(f"{flag} must be one of {BAD_INPUT_POLICIES}, got {policy!r}")

    def handle(self, kind: str, doc_id: str, where: str) -> None:
        """Raise `BadInput` for `where`, or count the document as skipped."""
        flag = "--on-bad-utf8" if kind == "bad_utf8" else "--on-bad-json"
        if (self.on_bad_utf8 if kind == "bad_utf8" else self.on_bad_json) == "error":
            raise BadInput(f"{where} (pass {flag} skip to skip and count such documents)")
        split = self.split_of(doc_id)
        self.counts.setdefault(split, dict.fromkeys(SKIP_KINDS, 0))[kind] += 1
        if len(self.locations) < 20:
            self.locations.append(where)

    def of(self, split: str) -> dict[str, int]:
        """{kind: count} for one split (every kind present, zeros included)."""
        return dict(self.counts.get(split, dict.fromkeys(SKIP_KINDS, 0)))

    def total(self) -> int:
        return sum(n for per in self.counts.values() for n in per.values())


class DocumentReader:
    """Iterates (doc_id, text) of one file; `bytes_read` tracks progress through the file.

    `digest`, if given, receives the file's bytes: for text and JSONL exactly the bytes
    that were read while tokenizing (no second pass); for Parquet and Arrow, whose
    readers seek, a separate sequential pass at the end.
    """

    def __init__(self, path: str, name: str, text_field: str = "text", digest=None,
                 bad: BadDocuments | None = None):
        self.path, self.name, self.text_field = path, name, text_field
        self.digest = digest if digest is not None else hashlib.sha256()
        self.bad = bad if bad is not None else BadDocuments()
        self.size = os.path.getsize(path)
        self.bytes_read = 0
        self.position = ""  # the last line or row read, for an error that stops the file

    def __iter__(self) -> Iterator[tuple[str, str]]:
        try:
            if self.name.endswith(JSONL_SUFFIXES):
                yield from self._jsonl()
            elif self.name.endswith(".parquet"):
                yield from self._table(self._parquet_batches())
            elif self.name.endswith(".arrow"):
                yield from self._table(self._arrow_batches())
            else:
                yield from self._text()
        except (BadInput, PermissionError, FileNotFoundError):
            raise  # these already name the file
        # gzip raises EOFError, OSError (BadGzipFile) or zlib.error; pyarrow ArrowInvalid (a
        # ValueError) or OSError. Each is about this file, whose name the library never says.
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise BadInput(self._unreadable(e)) from e

    def _unreadable(self, err: Exception) -> str:
        kind = next((k for suffix, k in _FORMATS if self.name.endswith(suffix)), "text")
        after = f" after {self.position}" if self.position else ""
        at = f", at byte {self.bytes_read} of {self.size}" if self.bytes_read else f" ({self.size} bytes)"
        return (f"{self.path}: cannot read it as {kind}{after}{at}: "
                f"{err} ({type(err).__name__}); the file is truncated or corrupt: re-create it or leave it "
                "out of --input")

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
        text = self._decode(raw, self.name, lambda e: f"{self.path}: byte {e.start}")
        if text:
            yield self.name, text

    def _jsonl(self) -> Iterator[tuple[str, str]]:
        with self._open() as f:
            for lineno, line in enumerate(f, start=1):
                self.position = f"line {lineno}"
                if not line.strip():
                    continue  # blank lines are allowed
                where, doc_id = f"{self.path}:{lineno}", f"{self.name}:{lineno}"
                text = self._decode(line, doc_id, lambda e: f"{where} (byte {e.start} of the line)")
                if text is None:
                    continue
                text = self._json_text(text, doc_id, where, has_escapes=b"\\ud" in line or b"\\uD" in line)
                if text:
                    yield doc_id, text

    def _json_text(self, line: str, doc_id: str, where: str, has_escapes: bool) -> str | None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return self.bad.handle("bad_json", doc_id, f"{where}: not valid JSON ({e.msg} at column {e.colno})")
        if not isinstance(record, dict):
            return self.bad.handle("bad_json", doc_id, f"{where}: a JSON {type(record).__name__}, not an object")
        if self.text_field not in record:
            raise BadInput(f"{where}: no {self.text_field!r} field (found {sorted(record)}); "
                           "pass --text-field to name the text field")
        text = record[self.text_field]
        if text is None:
            return None
        if not isinstance(text, str):
            raise BadInput(f"{where}: field {self.text_field!r} is {type(text).__name__}, not a string")
        if has_escapes:  # only a \uD800-\uDFFF escape can smuggle a lone surrogate in
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return self.bad.handle("bad_utf8", doc_id, f"{where}: field {self.text_field!r} holds a lone "
                                       f"surrogate at character {e.start}")
        return text

    def _decode(self, raw: bytes, doc_id: str, where) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self.bad.handle("bad_utf8", doc_id, f"{where(e)}: not valid UTF-8")

    # -- Parquet and Arrow: columnar batches ------------------------------------------------

    def _table(self, batches) -> Iterator[tuple[str, str]]:
        row = 0
        for column, fraction in batches:
            values = column.to_pylist()
            binary = _is_binary(column.type)
            for i, text in enumerate(values):
                doc_id = f"{self.name}:{row + i}"
                if binary and text is not None:
                    text = self._decode(text, doc_id, lambda e: f"{self.path} row {row + i} (byte {e.start})")
                if text:
                    yield doc_id, text
            row += len(values)
            self.bytes_read, self.position = int(self.size * fraction), f"row {row - 1}"
        self._hash_whole_file()

    def _column(self, schema, where: str) -> None:
        if self.text_field not in schema.names:
            raise BadInput(f"{where}: no column {self.text_field!r} (found {schema.names}); "
                           "pass --text-field to name the text column")
        kind = schema.field(self.text_field).type
        if not (_is_string(kind) or _is_binary(kind)):
            raise BadInput(f"{where}: column {self.text_field!r} is {kind}, not a string column")

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
