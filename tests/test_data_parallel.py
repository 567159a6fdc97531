"""data_prep with worker processes: the output does not depend on --workers; shard sizes; progress.

A small byte-level BPE (vocab 300) is trained once with the real trainer; sharding with it
uses spawned tokenization workers (the byte tokenizer always encodes inline).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from data_prep import groups, shard, train_tokenizer
from data_prep.pack import samples_for_megabytes
from data_prep.tokenizer import load_tokenizer

WORDS = "feedback attention memory block working local global sliding window".split()


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    rng = np.random.default_rng(1)
    (root / "in").mkdir()
    for f in range(6):
        with open(root / "in" / f"part{f}.jsonl", "w") as out:
            for _ in range(40):
                out.write(json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(5, 200))))}) + "\n")
    (root / "in" / "long.txt").write_text(" ".join(rng.choice(WORDS, 3000)))
    train_tokenizer.main(["--input", str(root / "in"), "--vocab-size", "300",
                          "--output", str(root / "tok.json"), "--no-progress"])
    return root


def digests(output):
    return {os.path.relpath(os.path.join(d, f), output): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(output) for f in files if "_state" not in d}


def run(root, output, workers, *extra):
    shard.main(["--input", str(root / "in"), "--tokenizer", str(root / "tok.json"), "--seq-len", "64",
                "--output", str(output), "--samples-per-shard", "16", "--valid-fraction", "0.1",
                "--no-progress", "--workers", str(workers), *map(str, extra)])


def test_one_and_two_workers_write_identical_files(corpus_and_tokenizer, tmp_path, monkeypatch):
    root = corpus_and_tokenizer
    # Small chunks and pack groups: many chunks in flight, crossing group boundaries.
    monkeypatch.setattr(groups, "CHUNK_CHARS", 2000)
    run(root, tmp_path / "one", 1, "--group-bytes", 20000)
    run(root, tmp_path / "two", 2, "--group-bytes", 20000)
    one = digests(tmp_path / "one")
    assert len([f for f in one if f.endswith(".tar")]) > 10
    assert one == digests(tmp_path / "two")
    manifest = json.loads((tmp_path / "one" / "train" / "manifest.json").read_text())
    assert len({s["group"] for s in manifest["sources"]}) > 1
    assert manifest["tokenizer"]["vocab_size"] == 300


def test_packed_stream_is_each_document_encoded_then_eod(corpus_and_tokenizer, tmp_path):
    """encode_stream (encode_batch_fast + numpy) gives exactly per-document encode() + EOD."""
    tok = load_tokenizer(str(corpus_and_tokenizer / "tok.json"))
    texts = ["feedback memory", "", "attention " * 50, "naïve 日本"]
    stream, lengths = tok.encode_stream(texts)
    expected = [i for t in texts for i in tok.encode(t) + [tok.eod_id]]
    assert stream.tolist() == expected and lengths.tolist() == [len(tok.encode(t)) for t in texts]
    assert stream.dtype == np.uint16


def test_shard_size_mb_bounds_every_shard(corpus_and_tokenizer, tmp_path):
    root = corpus_and_tokenizer
    shard.main(["--input", str(root / "in"), "--tokenizer", str(root / "tok.json"), "--seq-len", "64",
                "--output", str(tmp_path / "out"), "--shard-size-mb", "0.02", "--no-progress", "--workers", "1"])
    manifest = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    per_shard = samples_for_megabytes(0.02, 65, np.dtype(np.uint16))
    assert manifest["settings"]["samples_per_shard"] == per_shard > 1
    assert all(s["bytes"] <= 0.02 * 2**20 for s in manifest["shards"])
    assert max(s["samples"] for s in manifest["shards"]) == per_shard
    with pytest.raises(SystemExit):  # one or the other, not both
        shard.parse_args(["--output", "x", "--samples-per-shard", "4", "--shard-size-mb", "1"])


def test_progress_bar_shows_documents_and_tokens_per_second(corpus_and_tokenizer, tmp_path, capsys):
    root = corpus_and_tokenizer
    settings = shard.Settings(input=str(root / "in"), tokenizer=str(root / "tok.json"), seq_len=64)
    shard.run_task(settings, str(tmp_path / "out"), progress=True, workers=1)
    err = capsys.readouterr().err
    assert "docs/s" in err and "tok/s" in err and "100%" in err
