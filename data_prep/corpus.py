"""Where documents come from, which split they belong to, and how work is divided.

Inputs (`--input`):
- a folder: every input file below it (recursive): `.txt`, `.jsonl`, `.jsonl.gz`,
  `.jsonl.zst`, `.parquet`, `.arrow`. A folder written by HF `datasets`' `save_to_disk`
  (it holds a `state.json`) contributes exactly the `.arrow` files its `state.json`
  lists, so a `DatasetDict` folder contributes each of its splits;
- a glob (`data/*.jsonl.zst`, `corpus/**/*.txt`) or a single file;
- `stdlib`: the `.py` files of the running Python's standard library, found through
  `sysconfig.get_paths()["stdlib"]`, so the demo needs no network. `site-packages`,
  `__pycache__` and the test folders (`test`, `tests`, `idle_test`) are left out: the
  test folders are 60% of the bytes and hold deliberately malformed fixtures (bad
  encodings, odd bytes), which is not what a language model should learn from. What
  remains (~730 files, ~12 MB on 3.11) is all valid UTF-8.

Documents: see `readers` (a text file is one document; JSONL, Parquet and Arrow hold one
per line or row, in field/column `--text-field`). Empty documents are skipped.

Split: each document goes to `valid` when a stable hash (sha256) of its id falls below
`valid_fraction`, else to `train`. The id is the file's path relative to the input root
(plus `:<line>` for JSONL, `:<row>` for Parquet/Arrow), so the split depends neither on where the corpus lives nor
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

from data_prep.readers import INPUT_SUFFIXES, BadDocuments, DocumentReader

STDLIB = "stdlib"
HF_STATE_FILE = "state.json"  # written by datasets' save_to_disk beside its .arrow files
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
        raise ValueError(f"no input files matched {input_spec!r}{missing}: give a folder of "
                         f"{'/'.join(INPUT_SUFFIXES)} files, a glob, or 'stdlib'")
    sources = [_source(p, root) for p in paths]
    return sorted(sources, key=lambda s: s.name)


def _walk(root: str, suffixes: tuple[str, ...], excluded_dirs: frozenset) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded_dirs]
        hf_files = _hf_data_files(dirpath) if HF_STATE_FILE in filenames else None
        chosen = hf_files if hf_files is not None else [f for f in filenames if f.endswith(suffixes)]
        paths.extend(os.path.join(dirpath, f) for f in chosen)
    return paths


def _hf_data_files(folder: str) -> list[str] | None:
    """The .arrow files a `save_to_disk` folder's state.json lists (None if it is not one).

    Reading state.json rather than globbing `*.arrow` leaves out stray cache files.
    """
    try:
        with open(os.path.join(folder, HF_STATE_FILE), encoding="utf-8") as f:
            files = json.load(f).get("_data_files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(files, list):
        return None
    return [entry["filename"] for entry in files]


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


def iter_documents(source: SourceFile, text_field: str = "text", digest=None,
                   bad: BadDocuments | None = None) -> Iterator[tuple[str, str]]:
    """The non-empty documents of one file as (doc_id, text), streamed (see `readers`)."""
    return iter(DocumentReader(source.path, source.name, text_field, digest, bad))


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
