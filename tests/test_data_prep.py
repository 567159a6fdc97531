"""data_prep: corpus listing and split, tokenizers, packing, shards, manifests, resume, tasks.

Everything runs the real sharder on real files in tmp_path and reads the tars back with
the standard library's `tarfile` (independent of the webdataset writer).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from data_prep import corpus, pack, shard
from data_prep.tokenizer import load_tokenizer, token_dtype
from tests.time_bounds import HANG_GUARD_SECONDS

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def write_corpus(folder, n_txt=8, n_jsonl=2, lines_per_jsonl=6, seed=0):
    """A few deterministic .txt files and .jsonl files of random words (+ some non-ASCII)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "sub", exist_ok=True)

    def text():
        words = rng.choice(WORDS + ["naïve", "日本"], size=int(rng.integers(20, 120)))
        return " ".join(words) + "\n"

    for i in range(n_txt):
        (folder / ("sub" if i % 2 else ".") / f"doc{i:02d}.txt").write_text(text(), encoding="utf-8")
    for j in range(n_jsonl):
        with open(folder / f"part{j}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(lines_per_jsonl):
                f.write(json.dumps({"text": text(), "meta": j}) + "\n")
            f.write("\n")  # blank lines are allowed
    return folder


def run_shard(input_spec, output, *extra, seq_len=64):
    args = ["--input", str(input_spec), "--tokenizer", "byte", "--seq-len", str(seq_len),
            "--output", str(output), "--samples-per-shard", "8", "--valid-fraction", "0.25",
            "--no-progress", *map(str, extra)]
    return shard.main(args)


def read_tar(path):
    """[(key, tokens)] in tar order, read with tarfile + np.load."""
    with tarfile.open(path) as tar:
        out = []
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            assert ext == "tokens.npy"
            out.append((key, np.load(io.BytesIO(tar.extractfile(member).read()))))
    return out


def read_split(output, split):
    manifest = json.loads((output / split / "manifest.json").read_text())
    samples = [s for entry in manifest["shards"] for s in read_tar(output / split / entry["name"])]
    return manifest, samples


def expected_streams(folder, valid_fraction=0.25):
    """Per split, the byte stream the packer should see: each document's UTF-8 + EOD (0)."""
    streams = {"train": [], "valid": []}
    for source in corpus.list_sources(str(folder)):
        for doc_id, text in corpus.iter_documents(source):
            streams[corpus.split_of(doc_id, valid_fraction)] += list(text.encode()) + [0]
    return streams


def file_digests(output):
    return {os.path.relpath(os.path.join(d, f), output): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(output) for f in files if "_state" not in d}


# -- corpus and tokenizers ----------------------------------------------------------------

def test_stdlib_corpus_is_sorted_py_without_tests_and_splits_about_two_percent():
    sources = corpus.list_sources("stdlib")
    names = [s.name for s in sources]
    assert len(sources) > 300 and names == sorted(names)
    assert all(n.endswith(".py") and not os.path.isabs(n) for n in names)
    parts = {p for n in names for p in n.split("/")[:-1]}
    assert not parts & corpus.STDLIB_EXCLUDED_DIRS
    valid = [n for n in names if corpus.split_of(n, 0.02) == "valid"]
    assert 0.005 < len(valid) / len(names) < 0.05
    assert valid == [n for n in names if corpus.split_of(n, 0.02) == "valid"]  # stable


def test_byte_tokenizer_keeps_vocab_256_and_uses_nul_as_eod():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eod_id, tok.name) == (256, 0, "byte")
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.encode("a\x00b") == [97, 98]  # a NUL would read as a document boundary
    assert tok.encode_batch(["a", "b"]) == [[97], [98]]
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_trained_bpe_and_sentencepiece_load_with_eod(tmp_path):
    from data_prep import train_tokenizer
    import sentencepiece as spm

    write_corpus(tmp_path / "in")
    train_tokenizer.main(["--input", str(tmp_path / "in"), "--vocab-size", "300",
                          "--output", str(tmp_path / "tok.json"), "--no-progress"])
    hf = load_tokenizer(str(tmp_path / "tok.json"))
    assert (hf.vocab_size, hf.eod_id) == (300, 0)
    assert hf.encode_batch(["alpha beta"])[0] == hf.encode("alpha beta") and hf.eod_id not in hf.encode("alpha")

    spm.SentencePieceTrainer.train(input=str(tmp_path / "in" / "doc00.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=24, model_type="char", minloglevel=2)
    sp = load_tokenizer(str(tmp_path / "sp.model"))
    assert sp.eod_id == 2 and sp.vocab_size == 24 and all(3 <= i < 24 for i in sp.encode("alpha"))
    with pytest.raises(ValueError, match="neither 'byte' nor an existing file"):
        load_tokenizer(str(tmp_path / "nope.json"))


# -- shards and manifests -----------------------------------------------------------------

def test_shards_round_trip_every_token_with_eod_between_documents(tmp_path):
    write_corpus(tmp_path / "in")
    run_shard(tmp_path / "in", tmp_path / "out")
    streams = expected_streams(tmp_path / "in")
    for split in ("train", "valid"):
        manifest, samples = read_split(tmp_path / "out", split)
        assert manifest["seq_len"] == 64 and manifest["sample_len"] == 65 and manifest["dtype"] == "uint16"
        assert manifest["tokenizer"] == {"spec": "byte", "name": "byte", "vocab_size": 256, "eod_id": 0, "sha256": ""}
        assert manifest["total_samples"] == len(samples) == sum(s["samples"] for s in manifest["shards"]) > 0
        assert manifest["total_tokens"] == 65 * len(samples)
        for entry in manifest["shards"]:
            path = tmp_path / "out" / split / entry["name"]
            assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert entry["bytes"] == path.stat().st_size and entry["samples"] <= 8
        keys = [k for k, _ in samples]
        assert len(set(keys)) == len(keys) and all(k.startswith(f"{split}-g000000-") for k in keys)
        assert all(t.dtype == np.uint16 and t.shape == (65,) for _, t in samples)
        packed = np.concatenate([t for _, t in samples]).tolist()
        expected = streams[split]
        # Packing is the document stream cut into 65-token samples; only the tail is dropped.
        assert packed == expected[: len(packed)]
        assert len(expected) - len(packed) == manifest["dropped_tokens"] < 65
        assert packed.count(0) == expected[: len(packed)].count(0) > 0
    all_sources = [s["name"] for s in manifest["sources"]]
    assert all_sources == sorted(all_sources) and all(len(s["sha256"]) == 64 for s in manifest["sources"])
    assert not [f for f in os.listdir(tmp_path / "out" / "train") if f.startswith(".")]  # no temp files


def test_rerun_skips_finished_shards_and_rewrites_damaged_ones(tmp_path):
    write_corpus(tmp_path / "in")
    run_shard(tmp_path / "in", tmp_path / "out")
    before = file_digests(tmp_path / "out")
    mtimes = {f: os.stat(tmp_path / "out" / f).st_mtime_ns for f in before}

    run_shard(tmp_path / "in", tmp_path / "out")
    assert file_digests(tmp_path / "out") == before
    assert {f: os.stat(tmp_path / "out" / f).st_mtime_ns for f in before} == mtimes  # nothing rewritten

    victim = tmp_path / "out" / "train" / "train-g000000-000001.tar"
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size, wrong bytes
    os.remove(tmp_path / "out" / "train" / "train-g000000-000002.tar")
    run_shard(tmp_path / "in", tmp_path / "out")
    assert file_digests(tmp_path / "out") == before


def test_interrupted_run_resumes_without_rewriting_recorded_shards(tmp_path, monkeypatch):
    write_corpus(tmp_path / "in")
    run_shard(tmp_path / "in", tmp_path / "reference")

    real_write, calls = pack.write_shard, []

    def crash_after_three(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        calls.append(args[0])
        return real_write(*args)

    monkeypatch.setattr(pack, "write_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_shard(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()  # nothing partial is listed
    finished = {p: os.stat(p).st_mtime_ns for p in calls}

    monkeypatch.setattr(pack, "write_shard", real_write)
    run_shard(tmp_path / "in", tmp_path / "out")
    assert {p: os.stat(p).st_mtime_ns for p in calls} == finished
    assert file_digests(tmp_path / "out") == file_digests(tmp_path / "reference")


def test_output_bytes_do_not_depend_on_the_clock(tmp_path, monkeypatch):
    """Regression: manifests carried a `created` time (to the second), so two runs on the same
    input differed whenever a second boundary fell between them; the interrupted-run test
    above failed about 1 run in 12 that way. Shifting the clock by an hour makes it certain."""
    import time

    write_corpus(tmp_path / "in")
    run_shard(tmp_path / "in", tmp_path / "now")
    real_time, real_gmtime = time.time, time.gmtime
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    monkeypatch.setattr(time, "gmtime", lambda secs=None: real_gmtime(time.time() if secs is None else secs))
    run_shard(tmp_path / "in", tmp_path / "later")
    assert file_digests(tmp_path / "later") == file_digests(tmp_path / "now")


def test_three_tasks_plus_merge_give_the_same_files_as_one_task(tmp_path):
    """Shards are named by pack group, not task, so 'equal' here means byte-identical files
    (hence the same samples, keys and token counts) and identical manifests."""
    write_corpus(tmp_path / "in", n_txt=12, n_jsonl=3)
    small_groups = ("--group-bytes", "1500")
    run_shard(tmp_path / "in", tmp_path / "one", *small_groups)
    for i in range(3):
        run_shard(tmp_path / "in", tmp_path / "three", *small_groups, "--num-tasks", 3, "--task-index", i)
        if i == 1:
            with pytest.raises(ValueError, match=r"tasks \[2\] of 3 have not finished"):
                shard.main(["--merge", "--output", str(tmp_path / "three")])
    shard.main(["--merge", "--output", str(tmp_path / "three")])

    tasks = [json.loads((tmp_path / "three" / "_state" / f"task-{i:05d}-of-00003.json").read_text()) for i in range(3)]
    assert all(t["groups"] for t in tasks) and tasks[0]["num_groups"] >= 3
    assert file_digests(tmp_path / "three").keys() == file_digests(tmp_path / "one").keys()
    for split in ("train", "valid"):
        one, one_samples = read_split(tmp_path / "one", split)
        three, three_samples = read_split(tmp_path / "three", split)
        assert one == three
        assert [(k, t.tolist()) for k, t in one_samples] == [(k, t.tolist()) for k, t in three_samples]


def test_real_stdlib_corpus_shards_with_both_splits(tmp_path):
    shard.main(["--input", "stdlib", "--tokenizer", "byte", "--seq-len", "512",
                "--output", str(tmp_path / "out"), "--no-progress"])
    for split in ("train", "valid"):
        manifest = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        assert manifest["total_samples"] >= 1 and manifest["documents"] >= 1


# -- errors name the thing ----------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", r"no input files matched '.*missing' \(no such file or folder\): give a folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", r"no input files matched '.*empty': give a folder of \.txt/\.jsonl/"),
    (lambda d: str(d / "*.jsonl"), r"no input files matched .*: give a folder of \.txt/\.jsonl/\.jsonl\.gz/\.jsonl\.zst/\.parquet/\.arrow "
     r"files, a glob, or 'stdlib'"),
])
def test_missing_or_empty_input_is_named(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        run_shard(make(tmp_path), tmp_path / "out")


def test_jsonl_without_text_field_names_file_and_line(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:3: no 'text' field \(found \['body'\]\); pass --text-field"):
        run_shard(tmp_path / "in", tmp_path / "out")
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not valid JSON"):
        run_shard(tmp_path / "in", tmp_path / "out2")


def test_bad_settings_and_too_little_data_are_explained(tmp_path):
    write_corpus(tmp_path / "in")
    with pytest.raises(ValueError, match="--seq-len must be positive, got 0"):
        run_shard(tmp_path / "in", tmp_path / "out", seq_len=0)
    with pytest.raises(ValueError, match=r"too little data for one train sample: .*fewer than seq_len\+1=100001"):
        run_shard(tmp_path / "in", tmp_path / "big", seq_len=100000)
    assert not (tmp_path / "big" / "train" / "manifest.json").exists()
    with pytest.raises(ValueError, match=r"too little data for one valid sample: .*raise --valid-fraction"):
        shard.main(["--input", str(tmp_path / "in"), "--tokenizer", "byte", "--seq-len", "8",
                    "--output", str(tmp_path / "few"), "--valid-fraction", "0.001", "--no-progress"])
    run_shard(tmp_path / "in", tmp_path / "ok", seq_len=16)
    with pytest.raises(ValueError, match=r"made with different settings \{'seq_len': \(16, 32\)\}"):
        run_shard(tmp_path / "in", tmp_path / "ok", seq_len=32)


def test_cli_prints_error_and_help(tmp_path):
    cmd = [sys.executable, "-m", "data_prep.shard", "--input", str(tmp_path / "nowhere"),
           "--tokenizer", "byte", "--seq-len", "8", "--output", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert result.returncode != 0 and "error: no input files matched" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "data_prep.shard", "--help"],
                               capture_output=True, text=True, timeout=HANG_GUARD_SECONDS).stdout
    assert "--samples-per-shard" in help_text and "--merge" in help_text

