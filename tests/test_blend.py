"""pipeline.blend: mixing two real sharded datasets in fixed proportions, resumably, DP-split.

Two small byte-token datasets (different texts, so keys and tokens tell them apart) are
sharded once per module with the real sharder.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest

from data_prep import shard
from pipeline.data.blend import BLEND_PERIOD, BlendLoader, blend_schedule

SEQ_LEN = 16


def make_dataset(root, name, words, docs, tokenizer="byte"):
    rng = np.random.default_rng(len(name))
    (root / name).mkdir()
    with open(root / name / "docs.jsonl", "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": f"{name} {i}: " + " ".join(rng.choice(words, 12))}) + "\n")
    shard.main(["--input", str(root / name), "--tokenizer", tokenizer, "--seq-len", str(SEQ_LEN),
                "--output", str(root / f"{name}-out"), "--samples-per-shard", "8",
                "--valid-fraction", "0.2", "--no-progress", "--workers", "1"])
    return str(root / f"{name}-out" / "train" / "manifest.json")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return [make_dataset(root, "web", ["the", "a", "cat", "sat", "mat"], 40),
            make_dataset(root, "code", ["def", "return", "self", "import", "lambda"], 25)]


def make(manifests, **kw):
    args = {"micro_batch_size": 4, "seq_len": SEQ_LEN, "seed": 5, **kw}
    return BlendLoader(manifests, [0.7, 0.3], **args)


def keys_of(loader, steps):
    return [b["keys"] for b in islice(loader, steps)]


def samples_of(manifest_path):
    manifest = json.load(open(manifest_path))
    folder = manifest_path.rsplit("/", 1)[0]
    out = {}
    for entry in manifest["shards"]:
        with tarfile.open(f"{folder}/{entry['name']}") as tar:
            for m in tar.getmembers():
                out[m.name.split(".")[0]] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return out


def test_schedule_quotas_follow_the_weights_in_every_period():
    sources, quota = blend_schedule([0.7, 0.3])
    assert quota.tolist() == [700, 300] and np.bincount(sources).tolist() == [700, 300]
    prefix = np.cumsum(sources == 0)
    assert np.all(np.abs(prefix - 0.7 * np.arange(1, BLEND_PERIOD + 1)) <= 1)  # smooth, not clumped
    sources, quota = blend_schedule([1, 1, 1])
    assert sorted(quota.tolist()) == [333, 333, 334]


def test_realises_the_weights_within_two_percent_over_10k_samples(manifests):
    loader = make(manifests, micro_batch_size=10)
    counts = Counter(k.split(":")[0] for batch in keys_of(loader, 1000) for k in batch)
    assert sum(counts.values()) == 10_000
    assert abs(counts["0"] / 10_000 - 0.7) < 0.02 and abs(counts["1"] / 10_000 - 0.3) < 0.02
    realised = loader.realised_proportions()
    assert realised == {manifests[0]: counts["0"] / 10_000, manifests[1]: counts["1"] / 10_000}
    assert loader.state_dict()["samples_per_source"] == [counts["0"], counts["1"]]


def test_batches_hold_the_source_samples_and_every_source_epoch_is_a_permutation(manifests):
    loader = make(manifests)
    source_samples = [samples_of(m) for m in manifests]
    keys, rows = [], []
    for batch in islice(loader, 600):
        keys += batch["keys"]
        rows += list(batch["tokens"].numpy())
    for key, row in zip(keys, rows):
        s, sample_key = key.split(":")
        assert row.tolist() == source_samples[int(s)][sample_key].tolist()
    for s in (0, 1):
        stream = [k.split(":")[1] for k in keys if k.startswith(f"{s}:")]
        n = len(source_samples[s])
        assert len(stream) > 2 * n  # several epochs of the smaller source
        assert sorted(stream[:n]) == sorted(source_samples[s]) == sorted(stream[n:2 * n])
        assert stream[:n] != stream[n:2 * n]  # reshuffled each epoch


def test_same_seed_same_batches_other_seed_other_order(manifests):
    assert keys_of(make(manifests), 30) == keys_of(make(manifests), 30)
    assert keys_of(make(manifests), 30) != keys_of(make(manifests, seed=6), 30)


@pytest.mark.parametrize("consumed", [0, 1, 7, 260])
def test_resume_continues_exactly(manifests, consumed):
    straight = make(manifests)
    uninterrupted = keys_of(straight, consumed + 40)
    first = make(manifests)
    before = keys_of(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = make(manifests)
    resumed.load_state_dict(state)
    assert before + keys_of(resumed, 40) == uninterrupted
    assert resumed.realised_proportions() == straight.realised_proportions()
    assert resumed.state_dict()["samples_per_source"] == straight.state_dict()["samples_per_source"]


def test_dp2_ranks_are_disjoint_slices_of_the_single_process_batch(manifests):
    single = keys_of(make(manifests, micro_batch_size=4), 50)
    ranks = [keys_of(make(manifests, micro_batch_size=2, dp_rank=r, dp_world_size=2), 50) for r in range(2)]
    for step, (a, b) in enumerate(zip(*ranks)):
        assert a + b == single[step], step
    rank0 = make(manifests, micro_batch_size=2, dp_rank=0, dp_world_size=2)
    list(islice(rank0, 9))
    rank1 = make(manifests, micro_batch_size=2, dp_rank=1, dp_world_size=2)
    rank1.load_state_dict(rank0.state_dict())  # the position is global
    assert keys_of(rank1, 5) == ranks[1][9:14]


def test_bad_blends_are_explained(manifests, tmp_path):
    with pytest.raises(ValueError, match="need one weight per manifest: got 2 manifests and 1 weights"):
        BlendLoader(manifests, [1.0], 2, SEQ_LEN)
    with pytest.raises(ValueError, match="must be positive and finite"):
        BlendLoader(manifests, [1.0, 0.0], 2, SEQ_LEN)
    with pytest.raises(ValueError, match=r"below 1/1000 of the total: they would never be sampled"):
        BlendLoader(manifests, [1.0, 1e-5], 2, SEQ_LEN)
    state = make(manifests).state_dict()
    other = BlendLoader(manifests, [0.5, 0.5], 4, SEQ_LEN, seed=5)
    with pytest.raises(ValueError, match=r"checkpoint has weights=\[0.7, 0.3\], this loader has weights=\[0.5, 0.5\]"):
        other.load_state_dict(state)
    from data_prep import train_tokenizer
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("some text for a tokenizer " * 20)
    train_tokenizer.main(["--input", str(tmp_path / "t"), "--vocab-size", "270",
                          "--output", str(tmp_path / "tok.json"), "--no-progress"])
    bpe = make_dataset(tmp_path, "bpe", ["the", "a", "cat"], 60, tokenizer=str(tmp_path / "tok.json"))
    with pytest.raises(ValueError, match=r"cannot blend .*bpe-out.* different tokenizers"):
        BlendLoader([manifests[0], bpe], [0.5, 0.5], 2, SEQ_LEN)
