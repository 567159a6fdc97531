"""Long training samples from the shards (issue 14): `data_prep.shard --seq-len N` packs
documents into samples of N + 1 tokens whatever N, so samples far longer than any document
(here 64 documents of ~260 bytes per 16,385-token sample) come from the shards as they are, and
the loader resumes them exactly, as at any length. Validation samples stream the same way
(tests/test_micro_chunk_train.py). Measured at 1,048,576 tokens: see the README's long-sequence
section."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np

from data_prep import shard
from pipeline.data.loader import ShardLoader, manifest_info

SEQ_LEN = 16384


def _long_shards(root):
    (root / "in").mkdir()
    rng = np.random.default_rng(0)
    with open(root / "in" / "docs.jsonl", "w") as f:
        for i in range(1500):  # ~390k bytes: 20+ samples of 16k tokens
            words = rng.choice(["fam", "memory", "block", "attention", "feedback", "loop"], size=40)
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(words)}) + "\n")
    shard.main(["--input", str(root / "in"), "--tokenizer", "byte", "--seq-len", str(SEQ_LEN),
                "--output", str(root / "out"), "--samples-per-shard", "2", "--valid-fraction", "0.1",
                "--no-progress"])
    return str(root / "out" / "train" / "manifest.json")


def test_samples_longer_than_any_document_come_from_the_shards_and_resume_exactly(tmp_path):
    manifest = _long_shards(tmp_path)
    make = lambda: ShardLoader(manifest, micro_batch_size=2, seq_len=SEQ_LEN, seed=5)  # noqa: E731
    batches = list(islice(make(), 6))
    tokens = batches[0]["tokens"]
    assert tokens.shape == (2, SEQ_LEN + 1)
    eod = manifest_info(manifest)["eod_id"]  # one after every joined document
    assert int((tokens[0] == eod).sum()) >= 40, "a long sample joins many documents"
    first = make()
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for expected, got in zip(batches[3:], islice(resumed, 3)):
        assert expected["keys"] == got["keys"]
        assert np.array_equal(expected["tokens"].numpy(), got["tokens"].numpy())
