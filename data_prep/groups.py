"""Pack groups into shards: documents -> tokenization workers -> packers -> tar shards.

    for job, result in pack_groups(jobs, settings, tokenizer, encoder, output, bar):
        ...   # result: the group's sources, and per split its shards, documents, lengths

One loop in the main process reads documents (`readers`), assigns each to its split,
and cuts them into chunks of about CHUNK_CHARS characters of one (group, split). Chunks
go to the `Encoder` (worker processes); their results are consumed strictly in
submission order, so each split's packer sees exactly the document stream a
single-process run sees: the shards are the same bytes for any `--workers`. Reading runs
ahead of packing by at most `encoder.window` chunks, which bounds memory. Group ends and
source ends travel in the same ordered queue, so a group is closed (its last shard
written) only after all of its chunks were packed, while the workers already encode the
next group.

Each chunk carries its documents' locations (path plus `:line` or `:row`), so a failure to
encode it, inline or in a worker process, ends as an error that names the file, and the
document when the tokenizer says which one (`EODInTextError`).

A shard recorded in `job.done` (an interrupted run's progress, or a manifest being
repaired) is not rewritten if the file is intact: see `pack.ShardSink`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from data_prep import corpus
from data_prep.encode import Encoder
from data_prep.pack import Packer, ShardSink
from data_prep.readers import BadDocuments, BadInput, DocumentReader
from data_prep.tokenizer import EODInTextError, Tokenizer, token_dtype

CHUNK_CHARS = 1 << 18  # ~256K characters per worker task: small enough to balance the tail
CHUNK_DOCUMENTS = 4096  # and at most this many documents (tiny documents, per-task overhead)


@dataclass
class GroupJob:
    """One pack group to (re)build; `on_shard` hears of every finished shard record."""

    index: int
    sources: list[corpus.SourceFile]
    done: dict[str, dict] = field(default_factory=dict)
    on_shard: Callable[[dict], None] = lambda record: None
    splits: tuple[str, ...] = corpus.SPLITS  # whose shards are written (repair: one split)


class _Group:
    """The state of one group while its chunks are in flight."""

    def __init__(self, job: GroupJob, sample_len: int, tokenizer: Tokenizer, output: str,
                 samples_per_shard: int, writer: ThreadPoolExecutor, bad: BadDocuments):
        dtype = token_dtype(tokenizer.vocab_size)
        self.job = job
        self.packers = {s: Packer(sample_len, tokenizer.eod_id, dtype) for s in corpus.SPLITS}
        self.sinks = {s: ShardSink(os.path.join(output, s), s, job.index, samples_per_shard,
                                   job.done, job.on_shard, writer, enabled=s in job.splits)
                      for s in corpus.SPLITS}
        self.lengths: dict[str, list[np.ndarray]] = {s: [] for s in corpus.SPLITS}
        self.sources: list[dict] = []
        self.bad = bad  # this group's skips, per split

    def result(self) -> dict:
        splits = {}
        for s in corpus.SPLITS:
            self.sinks[s].close()
            lengths = np.concatenate(self.lengths[s]) if self.lengths[s] else np.zeros(0, np.uint32)
            splits[s] = {"shards": self.sinks[s].shards, "documents": len(lengths),
                         "dropped_tokens": self.packers[s].buffered, "lengths": lengths,
                         "skipped_documents": self.bad.of(s)}
        return {"sources": self.sources, "splits": splits, "bad_locations": self.bad.locations}


class _Rate:
    """documents/s and tokens/s on the progress bar, refreshed at most twice a second."""

    def __init__(self, bar):
        self.bar, self.start, self.last = bar, time.monotonic(), 0.0
        self.documents = self.tokens = 0

    def add(self, documents: int, tokens: int, force: bool = False) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.monotonic()
        if self.bar is not None and (force or now - self.last > 0.5):
            elapsed = max(now - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.documents / elapsed:,.0f} docs/s, "
                                     f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
            self.last = now


def pack_groups(jobs: list[GroupJob], settings, tokenizer: Tokenizer, encoder: Encoder, output: str,
                bar=None, on_bad: dict[str, str] | None = None) -> Iterator[tuple[GroupJob, dict]]:
    """Build every job's shards; yield (job, result) as each group finishes, in order.

    `on_bad` holds `BadDocuments`' policies (on_bad_utf8, on_bad_json: 'error' or 'skip').
    """
    pending: deque = deque()
    rate = _Rate(bar)
    in_flight = 0
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    try:
        for item in _produce(jobs, settings, tokenizer, encoder, output, on_bad or {}, bar, writer):
            pending.append(item)
            in_flight += item[0] == "chunk"
            # Consume from the front while too many chunks are in flight, and consume
            # bookkeeping items as soon as they reach the front (they cost nothing).
            while pending and (in_flight > encoder.window or pending[0][0] != "chunk"):
                in_flight -= pending[0][0] == "chunk"
                yield from _consume(pending.popleft(), rate)
        while pending:
            yield from _consume(pending.popleft(), rate)
        rate.add(0, 0, force=True)  # the final rates, however short the run
    finally:
        writer.shutdown(wait=True, cancel_futures=True)  # on error: finish the write in hand only


def _consume(item: tuple, rate: _Rate) -> Iterator[tuple[GroupJob, dict]]:
    kind, group = item[:2]
    if kind == "chunk":
        split, handle, where = item[2:]
        stream, lengths = _encoded(handle, where)
        group.sinks[split].add(group.packers[split].add_stream(stream))
        group.lengths[split].append(lengths)
        rate.add(len(lengths), len(stream) - len(lengths))
    elif kind == "source":
        group.sources.append(item[2])
    else:  # "end": every chunk of the group has been packed
        yield group.job, group.result()


def _encoded(handle, where: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's (stream, lengths); a failure, here or in a worker, names its documents' file."""
    try:
        return handle.get()
    except EODInTextError as e:
        raise BadInput(f"{where[e.index]}: {e}") from e
    except Exception as e:  # a worker's error arrives as its type and message only
        span = where[0] if len(where) == 1 else f"{where[0]} .. {where[-1]}"
        raise BadInput(f"{span}: tokenizing these {len(where)} documents failed: {e} "
                       f"({type(e).__name__})") from e


def _produce(jobs: list[GroupJob], settings, tokenizer: Tokenizer, encoder: Encoder, output: str,
             on_bad: dict[str, str], bar, writer: ThreadPoolExecutor) -> Iterator[tuple]:
    """("chunk", group, split, handle, where), ("source", group, record) and ("end", group) items.

    `where` holds each chunk document's location (path, plus `:line` or `:row`) for errors.
    """
    def split_of(doc_id: str) -> str:
        return corpus.split_of(doc_id, settings.valid_fraction)

    for job in jobs:
        group = _Group(job, settings.seq_len + 1, tokenizer, output, settings.samples_per_shard, writer,
                       BadDocuments(**on_bad, split_of=split_of))
        texts = {s: [] for s in corpus.SPLITS}
        where = {s: [] for s in corpus.SPLITS}
        chars = {s: 0 for s in corpus.SPLITS}
        for source in job.sources:
            digest = hashlib.sha256()
            reader = DocumentReader(source.path, source.name, settings.text_field, digest, group.bad)
            reported = 0
            for doc_id, text in reader:
                split = split_of(doc_id)
                texts[split].append(text)
                where[split].append(source.path + doc_id[len(source.name):])
                chars[split] += len(text)
                if chars[split] >= CHUNK_CHARS or len(texts[split]) >= CHUNK_DOCUMENTS:
                    yield "chunk", group, split, encoder.submit(texts[split]), where[split]
                    texts[split], where[split], chars[split] = [], [], 0
                    reported = _advance(bar, reader.bytes_read, reported)
            _advance(bar, source.size, reported)
            yield "source", group, {**source.record(), "sha256": digest.hexdigest(), "group": job.index}
        for split in corpus.SPLITS:  # chunks may span sources, but not groups
            if texts[split]:
                yield "chunk", group, split, encoder.submit(texts[split]), where[split]
        yield "end", group


def _advance(bar, position: int, reported: int) -> int:
    if bar is not None and position > reported:
        bar.update(position - reported)
    return max(position, reported)
