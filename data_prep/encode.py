"""Parallel, order-preserving tokenization for the sharder.

    with Encoder("tok.json", workers=4) as enc:
        handle = enc.submit(texts)            # returns at once
        stream, lengths = handle.get()        # [n_tokens + n_docs] ids with EOD, [n_docs]

A chunk (a list of document texts) is encoded by `Tokenizer.encode_stream` in a worker
process. The caller collects results in the order it submitted them, so packing, and
with it every shard byte, is the same for any number of workers and any chunking.

Why these choices:
- `spawn`, not `fork`: HF tokenizers' thread pool does not survive a fork (it disables
  itself, with a warning, in a child forked after it ran), and the sharder may run inside
  a process (pytest, a notebook) that has threads of its own. A worker costs ~0.4 s to start
  (interpreter, numpy, tokenizer). As with any spawn pool, a script that calls
  `shard.run_task` must do so under `if __name__ == "__main__":` (the workers import it).
- With several workers each one's HF tokenizer runs single-threaded
  (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1): N processes on N cores already
  fill the machine, and oversubscribed threads only add switching.
- `workers=1` encodes in the calling process (no pickling of texts and ids) and lets the
  HF tokenizer use its own threads, which is then the fastest use of the machine. So does
  a `cheap` tokenizer (byte): its encoding is a copy, cheaper than shipping the text.
- Backpressure is the caller's: it keeps a bounded window of handles (`window`), so memory
  stays bounded whatever the input size (`Pool.imap` would read the whole input ahead).
- Errors surface at `handle.get()`, inline or in a worker alike, where the caller knows
  which documents the chunk held and can name their file. A worker whose tokenizer fails
  to load keeps the error and raises it for its first chunk: an exception escaping a Pool
  initializer would make the Pool restart the worker forever, printing a traceback each time.
"""

from __future__ import annotations

import multiprocessing
import os

import numpy as np

from data_prep.tokenizer import Tokenizer, load_tokenizer

_worker_tokenizer: Tokenizer | None = None
_worker_error: Exception | None = None


def default_workers() -> int:
    """All cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Done:
    """The handle of a chunk encoded inline: its result, or its error raised at `get`."""

    def __init__(self, encode, texts: list[str]):
        try:
            self._value, self._error = encode(texts), None
        except Exception as e:
            self._value, self._error = None, e

    def get(self, timeout: float | None = None):
        if self._error is not None:
            raise self._error
        return self._value


class Encoder:
    """Submits chunks of texts to `workers` processes (or encodes inline for one)."""

    def __init__(self, tokenizer: Tokenizer, workers: int):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.tokenizer, self.workers = tokenizer, workers
        self._pool = None
        if workers > 1 and not tokenizer.cheap:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.spec,))

    @property
    def window(self) -> int:
        """How many chunks to keep in flight: enough that no worker waits for the reader."""
        return 2 * self.workers + 1

    def submit(self, texts: list[str]):
        if self._pool is None:
            return _Done(self.tokenizer.encode_stream, texts)
        return self._pool.apply_async(_encode_in_worker, (texts,))

    def close(self, ok: bool = True) -> None:
        if self._pool is not None:
            if ok:
                self._pool.close()
            else:
                self._pool.terminate()  # an error or Ctrl-C: don't finish queued work
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def _init_worker(spec: str) -> None:
    global _worker_tokenizer, _worker_error
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        _worker_tokenizer = load_tokenizer(spec)
    except Exception as e:  # raised for the first chunk (see the module docstring)
        _worker_error = e


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if _worker_error is not None:
        raise _worker_error
    return _worker_tokenizer.encode_stream(texts)
