"""Sharding throughput beside the tokenizer's own batch-encode speed, on the same input and machine.

    python -m benchmarks.data_throughput                       # stdlib, BPE 8192 trained first
    python -m benchmarks.data_throughput --tokenizer tok.json --input 'corpus/*.jsonl' --workers 1 2 4

Rows (tokens are document tokens, without EOD, the same count in every row):
- `raw HF encode_batch_fast`: the texts already in memory, one `encode_batch_fast` call
  using every core through the tokenizer's own threads. Nothing else (no reading, no ids
  out of the encodings): the ceiling the pipeline is measured against.
- `data_prep.shard --workers N`: the whole command in-process, from listing the files to
  the manifests: reading, split assignment, tokenizing in N worker processes (their start
  included), packing, tar writing, sha256, fsync.
Each row is the best of `--repeats` runs, interleaved, so that load from other processes
on the machine affects the rows alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from data_prep import corpus, shard, train_tokenizer
from data_prep.encode import default_workers
from data_prep.manifest import read_json


def load_texts(input_spec: str) -> list[str]:
    return [t for s in corpus.list_sources(input_spec) for _, t in corpus.iter_documents(s)]


def time_raw(tokenizer_path: str, texts: list[str]) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    start = time.perf_counter()
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(e) for e in encodings)


def time_pipeline(input_spec: str, tokenizer_path: str, workers: int, seq_len: int, output: str) -> tuple[float, int]:
    shutil.rmtree(output, ignore_errors=True)
    settings = shard.Settings(input=input_spec, tokenizer=tokenizer_path, seq_len=seq_len)
    start = time.perf_counter()
    shard.run_task(settings, output, progress=False, workers=workers)
    seconds = time.perf_counter() - start
    tokens = sum(int(np.load(os.path.join(output, s, "doc_lengths.npy")).sum()) for s in corpus.SPLITS)
    for s in corpus.SPLITS:
        assert read_json(os.path.join(output, s, "manifest.json"))["total_samples"] > 0
    return seconds, tokens


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="stdlib", help="as for data_prep.shard (default: stdlib)")
    p.add_argument("--tokenizer", default=None,
                   help="a HF tokenizer.json (default: train a byte-level BPE of --vocab-size on --input)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="data_throughput-")
    try:
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = os.path.join(work, "tokenizer.json")
            train_tokenizer.train_bpe(train_tokenizer.train_documents(args.input, "text", 0.02),
                                      args.vocab_size, tokenizer, progress=False)
        texts = load_texts(args.input)
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeats):
            runs = {"raw": lambda: time_raw(tokenizer, texts)}
            for w in args.workers:
                runs[f"w{w}"] = lambda w=w: time_pipeline(args.input, tokenizer, w, args.seq_len,
                                                          os.path.join(work, "out"))
            for name, run in runs.items():
                seconds, tokens = run()
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    raw_rate = best["raw"][1] / best["raw"][0]
    rows = [{"what": "raw HF encode_batch_fast (all cores)", "workers": "-", "seconds": best["raw"][0],
             "tokens": best["raw"][1], "rate": raw_rate}]
    for w in args.workers:
        seconds, tokens = best[f"w{w}"]
        rows.append({"what": "data_prep.shard", "workers": str(w), "seconds": seconds, "tokens": tokens,
                     "rate": tokens / seconds})
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"input {args.input}: {len(texts)} documents, {mb:.1f} MB; tokenizer {os.path.basename(tokenizer)} "
          f"(vocab {args.vocab_size if args.tokenizer is None else 'from file'}); seq_len {args.seq_len}; "
          f"{default_workers()} cores; best of {args.repeats}\n")
    print("| what | workers | seconds | tokens | tokens/s | % of raw |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['workers']} | {r['seconds']:.2f} | {r['tokens']:,} | "
              f"{r['rate']:,.0f} | {100 * r['rate'] / raw_rate:.0f}% |")
    return rows


if __name__ == "__main__":
    main()
