"""pipeline.data: the training and validation loaders over real webdataset shards.

One small dataset (byte tokens, seq_len 32, 8 samples per shard, so ~30 shards and
several shuffle windows) is sharded once per module with the real sharder.
"""

from __future__ import annotations

import io
import json
import tarfile
from itertools import islice

import numpy as np
import pytest
import torch

from data_prep import shard
from pipeline.data.loader import WINDOW_SHARDS, ShardLoader, build_valid_loader, manifest_info

SEQ_LEN = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    (root / "in").mkdir()
    rng = np.random.default_rng(0)
    with open(root / "in" / "docs.jsonl", "w") as f:
        for i in range(60):
            words = rng.choice(["fam", "memory", "block", "attention", "feedback", "loop"], size=25)
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(words)}) + "\n")
    shard.main(["--input", str(root / "in"), "--tokenizer", "byte", "--seq-len", str(SEQ_LEN),
                "--output", str(root / "out"), "--samples-per-shard", "8",
                "--valid-fraction", "0.2", "--no-progress"])
    return root / "out"


def train_manifest(data):
    return str(data / "train" / "manifest.json")


def all_samples(data, split="train"):
    """{key: tokens} read straight from the tars."""
    manifest = json.loads((data / split / "manifest.json").read_text())
    out = {}
    for entry in manifest["shards"]:
        with tarfile.open(data / split / entry["name"]) as tar:
            for m in tar.getmembers():
                out[m.name.split(".")[0]] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return out


def keys_of(loader, steps):
    return [batch["keys"] for batch in islice(loader, steps)]


def test_dataset_spans_several_shuffle_windows(data):
    info = manifest_info(train_manifest(data))
    assert info["num_shards"] > 2 * WINDOW_SHARDS and info["vocab_size"] == 256 and info["seq_len"] == SEQ_LEN


def test_batches_are_long_tensors_matching_the_shards(data):
    samples = all_samples(data)
    batch = next(iter(ShardLoader(train_manifest(data), micro_batch_size=4, seq_len=SEQ_LEN)))
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (4, SEQ_LEN + 1)
    for key, row in zip(batch["keys"], batch["tokens"]):
        assert row.tolist() == samples[key].tolist()


def test_same_seed_same_order_and_each_epoch_is_a_reshuffled_pass(data):
    make = lambda seed: ShardLoader(train_manifest(data), micro_batch_size=4, seq_len=SEQ_LEN, seed=seed)
    loader = make(7)
    steps = loader.steps_per_epoch
    two_epochs = keys_of(loader, 2 * steps)
    assert two_epochs == keys_of(make(7), 2 * steps)
    assert two_epochs[:steps] != keys_of(make(8), steps)
    epoch0 = [k for b in two_epochs[:steps] for k in b]
    epoch1 = [k for b in two_epochs[steps:] for k in b]
    n = manifest_info(train_manifest(data))["total_samples"]
    assert len(set(epoch0)) == len(epoch0) == steps * 4 == n - n % 4  # every sample once, tail dropped
    assert epoch0 != epoch1 and len(set(epoch1)) == len(epoch1)


@pytest.mark.parametrize("consumed", [0, 1, 5, "epoch_end", "past_epoch"])
def test_resume_continues_exactly_where_the_state_was_taken(data, consumed):
    make = lambda: ShardLoader(train_manifest(data), micro_batch_size=3, seq_len=SEQ_LEN, seed=3)
    steps = make().steps_per_epoch
    k = {"epoch_end": steps, "past_epoch": steps + 2}.get(consumed, consumed)
    total = steps + 6  # always crosses an epoch boundary after the resume or before it
    uninterrupted = keys_of(make(), k + total)

    first = make()
    it = iter(first)
    before = [next(it)["keys"] for _ in range(k)]
    state = first.state_dict()
    assert state["samples_consumed_this_rank"] == 3 * k
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert before + keys_of(resumed, total) == uninterrupted


def test_dp2_ranks_are_disjoint_and_union_is_the_single_process_batch(data):
    single_loader = ShardLoader(train_manifest(data), micro_batch_size=4, seq_len=SEQ_LEN)
    steps = single_loader.steps_per_epoch + 10  # into the second epoch
    single = keys_of(single_loader, steps)
    ranks = [ShardLoader(train_manifest(data), micro_batch_size=2, seq_len=SEQ_LEN,
                         dp_rank=r, dp_world_size=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == single_loader.steps_per_epoch
    per_rank = [keys_of(loader, steps) for loader in ranks]
    for step, (a, b) in enumerate(zip(*per_rank)):
        assert not set(a) & set(b)
        assert set(a) | set(b) == set(single[step]), step


def test_resume_state_from_rank0_works_on_rank1(data):
    """The position is global, so one rank's state can restore every rank."""
    make = lambda r: ShardLoader(train_manifest(data), micro_batch_size=2, seq_len=SEQ_LEN,
                                 dp_rank=r, dp_world_size=2)
    rank0 = make(0)
    list(islice(rank0, 7))
    rank1 = make(1)
    rank1.load_state_dict(rank0.state_dict())
    assert keys_of(rank1, 5) == keys_of(make(1), 12)[7:]


def test_load_state_dict_rejects_a_different_layout(data):
    state = ShardLoader(train_manifest(data), micro_batch_size=2, seq_len=SEQ_LEN).state_dict()
    other = ShardLoader(train_manifest(data), micro_batch_size=4, seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="checkpoint has micro_batch_size=2, this loader has micro_batch_size=4"):
        other.load_state_dict(state)


def test_valid_loader_is_finite_deterministic_and_dp_split(data):
    path = str(data / "valid" / "manifest.json")
    single = build_valid_loader(path, micro_batch_size=2, seq_len=SEQ_LEN, dp_rank=0, dp_world_size=1)
    batches = [b["keys"] for b in single]
    assert len(batches) == len(single) > 0 and batches == [b["keys"] for b in single]
    keys = [k for b in batches for k in b]
    assert keys == sorted(keys)  # manifest order: no shuffling
    halves = [list(build_valid_loader(path, 1, SEQ_LEN, dp_rank=r, dp_world_size=2)) for r in range(2)]
    assert [a["keys"] + b["keys"] for a, b in zip(*halves)] == batches


def test_seq_len_mismatch_names_both_lengths_and_the_manifest(data):
    with pytest.raises(ValueError, match=rf"{train_manifest(data)} was sharded with seq_len={SEQ_LEN} but seq_len=64"):
        ShardLoader(train_manifest(data), micro_batch_size=2, seq_len=64)


def test_corrupted_or_missing_shard_is_named(data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    manifest = json.loads((copy / "train" / "manifest.json").read_text())
    victim = copy / "train" / manifest["shards"][3]["name"]
    raw = bytearray(victim.read_bytes())
    raw[700] ^= 0xFF  # inside a token array: only the checksum can tell
    victim.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"shard {victim} fails its sha256 check.*python -m data_prep.shard"):
        ShardLoader(str(copy / "train" / "manifest.json"), micro_batch_size=2, seq_len=SEQ_LEN)
    victim.unlink()
    with pytest.raises(ValueError, match=rf"shard {victim} listed in .* is missing"):
        ShardLoader(str(copy / "train" / "manifest.json"), micro_batch_size=2, seq_len=SEQ_LEN,
                    verify_checksums=False)


def test_loader_works_with_torch_distributed_initialized(data, tmp_path):
    """webdataset's default nodesplitter raises once torch.distributed is up; ours has none."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        batch = next(iter(ShardLoader(train_manifest(data), micro_batch_size=2, seq_len=SEQ_LEN)))
        assert batch["tokens"].shape == (2, SEQ_LEN + 1)
    finally:
        dist.destroy_process_group()
