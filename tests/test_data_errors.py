"""Bad input ends every data_prep command as one line that names the file (and the line or
byte), with exit status 2 and no traceback (`--debug` shows it); bad lines can be skipped.

The files are real: gzip and zstd streams cut short, a text file named `.parquet`, JSONL
with broken lines. The commands run as subprocesses, as a user runs them.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_prep import corpus
from data_prep.readers import DocumentReader

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["fam", "memory", "block", "attention", "feedback", "naïve", "日本"]


def jsonl(n: int, seed: int = 0, words: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    return b"".join(json.dumps({"text": " ".join(rng.choice(WORDS, words))}).encode() + b"\n" for _ in range(n))


def write_zst(path: Path, data: bytes) -> None:
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write(data)


def truncated(path: Path, data: bytes) -> Path:
    """`data` compressed as `path`'s suffix says, then cut to half its bytes."""
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        write_zst(path, data)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr


def shard(input_dir: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("data_prep.shard", "--input", str(input_dir), "--tokenizer", "byte", "--seq-len", "32",
               "--output", str(output), "--valid-fraction", "0.2", "--no-progress", *extra)


@pytest.mark.parametrize("name, kind", [("a.jsonl.gz", "gzip-compressed JSONL"),
                                        ("a.jsonl.zst", "zstd-compressed JSONL"),
                                        ("a.parquet", "Parquet")])
def test_an_unreadable_file_is_one_line_naming_it_and_debug_shows_the_traceback(tmp_path, name, kind):
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / name
    if name.endswith(".parquet"):
        path.write_text("this is a text file that someone named .parquet\n")
    else:
        truncated(path, jsonl(400))
    stderr = assert_one_line_error(shard(tmp_path / "in", tmp_path / "out"), f"{path}: cannot read it as {kind}",
                                   "the file is truncated or corrupt")
    assert stderr.startswith("python -m data_prep.shard: error: ")
    debug = shard(tmp_path / "in", tmp_path / "out", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and str(path) in debug.stderr
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.jsonl.zst"])
def test_a_truncated_stream_names_the_last_line_read_and_the_byte_reached(tmp_path, name):
    # ~3 MB of text: more than the 1 MiB read buffer, so some lines come out before the cut.
    path = truncated(tmp_path / name, jsonl(40000, words=10))
    read = []
    with pytest.raises(ValueError) as err:
        for doc_id, _ in DocumentReader(str(path), name):
            read.append(doc_id)
    size = path.stat().st_size
    assert 0 < len(read) < 40000 and read[-1] == f"{name}:{len(read)}"
    assert f"{path}: cannot read it as " in str(err.value)
    assert f" after line {len(read)}, at byte {size} of {size}: " in str(err.value)


def lines_by_split(count: int, valid_fraction: float = 0.2) -> dict[str, list[int]]:
    lines = {split: [] for split in corpus.SPLITS}
    for line in range(1, count + 1):
        lines[corpus.split_of(f"a.jsonl:{line}", valid_fraction)].append(line)
    return lines


def test_bad_json_lines_fail_naming_the_line_or_are_skipped_and_counted_per_split(tmp_path):
    good = jsonl(60).splitlines(keepends=True)
    by_split = lines_by_split(60)
    bad = {by_split["train"][3]: b'{"text": "cut off\n', by_split["train"][7]: b"[1, 2]\n",
           by_split["valid"][1]: b"{oops}\n"}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"".join(bad.get(i + 1, line) for i, line in enumerate(good)))
    first = min(bad)
    assert_one_line_error(shard(tmp_path / "in", tmp_path / "fail"),
                          f"{tmp_path / 'in' / 'a.jsonl'}:{first}: not valid JSON",
                          "(pass --on-bad-json skip to skip and count such documents)")

    result = shard(tmp_path / "in", tmp_path / "out", "--on-bad-json", "skip")
    assert result.returncode == 0, result.stderr
    assert "skipped documents (train: 0 bad UTF-8, 2 bad JSON, valid: 0 bad UTF-8, 1 bad JSON)" in result.stderr
    assert f"a.jsonl:{by_split['train'][7]}: a JSON list, not an object" in result.stderr
    for split, count in (("train", 2), ("valid", 1)):
        manifest = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        assert manifest["skipped_documents"] == {"bad_utf8": 0, "bad_json": count}
        assert manifest["documents"] == len(by_split[split]) - count


def test_train_tokenizer_accepts_the_skip_flags_it_suggests(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl(30) + b'{"text": "bad \xff byte"}\n' + b"{not json}\n")
    command = ("data_prep.train_tokenizer", "--input", str(tmp_path / "in"), "--vocab-size", "280",
               "--output", str(tmp_path / "tok.json"), "--no-progress")
    assert_one_line_error(run(*command), f"{tmp_path / 'in' / 'a.jsonl'}:31 (byte 14 of the line): not valid UTF-8",
                          "pass --on-bad-utf8 skip")
    assert_one_line_error(run(*command, "--on-bad-utf8", "skip"), "a.jsonl:32: not valid JSON",
                          "pass --on-bad-json skip")
    result = run(*command, "--on-bad-utf8", "skip", "--on-bad-json", "skip")
    assert result.returncode == 0, result.stderr
    assert "1 bad UTF-8" in result.stderr and "1 bad JSON" in result.stderr
    assert json.loads((tmp_path / "tok.json").read_text())["model"]["type"] == "BPE"


@pytest.mark.parametrize("argv", [
    ["data_prep.shard", "--input", "{tmp}/missing", "--tokenizer", "byte", "--seq-len", "8", "--output", "{tmp}/o"],
    ["data_prep.train_tokenizer", "--input", "{tmp}/missing", "--vocab-size", "300", "--output", "{tmp}/t.json"],
    ["data_prep.validate", "{tmp}/missing/manifest.json"],
    ["data_prep.stats", "{tmp}/missing/manifest.json"],
    ["slurm.prep", "validate", "{tmp}/missing"],
])
def test_every_data_command_ends_a_user_error_as_one_named_line_with_status_2(tmp_path, argv):
    result = run(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    stderr = assert_one_line_error(result, f"{tmp_path}/missing")
    assert stderr.startswith(f"python -m {argv[0]}: error: ")
