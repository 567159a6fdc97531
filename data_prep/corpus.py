"""Where documents come from, which split they belong to, and how work is divided.

Inputs (`--input`):
- a folder: every `.txt` and `.jsonl` file below it (recursive);
- a glob (`data/*.jsonl`, `corpus/**/*.txt`) or a single file;
- `stdlib`: the `.py` files of the running Python's standard library, found through
  `sysconfig.get_paths()["stdlib"]`, so the demo needs no network. `site-packages`,
  `__pycache__` and the test folders (`test`, `tests`, `idle_test`) are left out: the
  test folders are 60% of the bytes and hold deliberately malformed fixtures (bad
  encodings, odd bytes), which is not what a language model should learn from. What
  remains (~730 files, ~12 MB on 3.11) is all valid UTF-8.

Documents: a `.txt` or `.py` file is one document; a `.jsonl` file holds one document
per non-blank line, in field `--text-field`. Empty documents are skipped.

Split: each document goes to `valid` when a stable hash (sha256) of its id falls below
`valid_fraction`, else to `train`. The id is the file's path relative to the input root
(plus `:<line>` for JSONL), so the split depends neither on where the corpus lives nor
on file order, and a single JSONL file still yields both splits.

Work division: files (sorted by relative name) are cut into *pack groups* of at least
`group_bytes` bytes, using sizes from `stat` only. A group is the unit of packing and of
parallel work: each group is packed on its own (its remainder dropped), so the samples
are the same whatever `--num-tasks` is; task i processes a contiguous slice of groups.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator

STDLIB = "stdlib"
INPUT_SUFFIXES = (".txt", ".jsonl")
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__",
                                  "test", "tests", "idle_test"})
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class SourceFile:
    """One input file. `name` is relative to the input root and identifies it everywhere."""

    path: str
    name: str
    size: int
    mtime_ns: int

    def record(self) -> dict:
        return {"name": self.name, "size": self.size, "mtime_ns": self.mtime_ns}


def list_sources(input_spec: str) -> list[SourceFile]:
    """The input files named by `input_spec` (folder, glob, file or 'stdlib'), sorted by name."""
    if input_spec == STDLIB:
        root = sysconfig.get_paths()["stdlib"]
        paths = _walk(root, suffixes=(".py",), excluded_dirs=STDLIB_EXCLUDED_DIRS)
    elif os.path.isdir(input_spec):
        root = input_spec
        paths = _walk(root, suffixes=INPUT_SUFFIXES, excluded_dirs=frozenset())
    else:
        root = _glob_root(input_spec)
        paths = [p for p in glob.glob(input_spec, recursive=True)
                 if os.path.isfile(p) and p.endswith(INPUT_SUFFIXES)]
    if not paths:
        missing = "" if glob.has_magic(input_spec) or os.path.exists(input_spec) else " (no such file or folder)"
        raise ValueError(f"no input files matched {input_spec!r}{missing}: give a folder of .txt/.jsonl "
                         "files, a glob, or 'stdlib'")
    sources = [_source(p, root) for p in paths]
    return sorted(sources, key=lambda s: s.name)


def _walk(root: str, suffixes: tuple[str, ...], excluded_dirs: frozenset) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded_dirs]
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(suffixes))
    return paths


def _glob_root(pattern: str) -> str:
    """The literal folder prefix of a glob: names stay stable if the corpus moves."""
    parts = pattern.split(os.sep)
    literal = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        literal.append(part)
    return os.sep.join(literal) or "."


def _source(path: str, root: str) -> SourceFile:
    st = os.stat(path)
    return SourceFile(path=path, name=os.path.relpath(path, root).replace(os.sep, "/"),
                      size=st.st_size, mtime_ns=st.st_mtime_ns)


def iter_documents(source: SourceFile, text_field: str = "text",
                   digest=None) -> Iterator[tuple[str, str]]:
    """The non-empty documents of one file as (doc_id, text), streamed.

    JSONL is read line by line, so a large file never sits in memory whole. `digest`,
    if given, is fed every byte read: the manifest's source checksum is then exactly
    of the bytes that were tokenized, at no extra read.
    """
    digest = digest if digest is not None else hashlib.sha256()
    with open(source.path, "rb") as f:
        if not source.name.endswith(".jsonl"):
            raw = f.read()
            digest.update(raw)
            text = _decode(raw, source.path)
            if text:
                yield source.name, text
            return
        for lineno, line in enumerate(f, start=1):
            digest.update(line)
            doc = _jsonl_document(line, lineno, source, text_field)
            if doc is not None and doc[1]:
                yield doc


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 at byte {e.start}") from None


def _jsonl_document(line: bytes, lineno: int, source: SourceFile, text_field: str) -> tuple[str, str] | None:
    if not line.strip():
        return None  # blank lines are allowed
    where = f"{source.path}:{lineno}"
    try:
        record = json.loads(_decode(line, where))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no {text_field!r} field (found {keys}); "
                         "pass --text-field to name the text field")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return f"{source.name}:{lineno}", text


def split_of(doc_id: str, valid_fraction: float) -> str:
    """'valid' for a stable pseudo-random `valid_fraction` of document ids, else 'train'."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    return "valid" if unit < valid_fraction else "train"


def group_sources(sources: list[SourceFile], group_bytes: int) -> list[list[SourceFile]]:
    """Consecutive files in groups of at least `group_bytes` (the last may be smaller)."""
    groups: list[list[SourceFile]] = [[]]
    size = 0
    for source in sources:
        if size >= group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(source)
        size += source.size
    return groups


def task_slice(num_groups: int, num_tasks: int, task_index: int) -> range:
    """The contiguous, balanced range of group indices that task `task_index` processes."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index {task_index} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    return range(task_index * num_groups // num_tasks, (task_index + 1) * num_groups // num_tasks)
