"""data_prep.validate and data_prep.stats on a real sharded folder (byte tokenizer)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import shard, stats, validate
from tests.time_bounds import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["fam", "memory", "block", "attention", "feedback", "loop", "naïve"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    rng = np.random.default_rng(0)
    (root / "in").mkdir()
    lengths = []
    for f in range(3):
        with open(root / "in" / f"docs{f}.jsonl", "w") as out:
            for i in range(40):
                text = " ".join(rng.choice(WORDS, int(rng.integers(2, 60))))
                lengths.append(len(text.encode()))
                out.write(json.dumps({"text": text}) + "\n")
    shard.main(["--input", str(root / "in"), "--tokenizer", "byte", "--seq-len", "32",
                "--output", str(root / "out"), "--samples-per-shard", "8", "--group-bytes", "4000",
                "--valid-fraction", "0.2", "--no-progress"])
    return root, lengths


def copy_of(data, tmp_path):
    shutil.copytree(data[0], tmp_path / "d")
    return tmp_path / "d" / "out" / "train" / "manifest.json"


def test_intact_folder_validates_clean(data, capsys):
    path = str(data[0] / "out" / "train" / "manifest.json")
    assert validate.main([path]) == 0
    assert "0 broken, 0 other problems" in capsys.readouterr().out


def test_corrupted_truncated_and_missing_shards_are_each_named_and_repaired(data, tmp_path, capsys):
    path = copy_of(data, tmp_path)
    manifest = json.loads(path.read_text())
    names = [s["name"] for s in manifest["shards"]]
    corrupt, truncated, missing = path.parent / names[1], path.parent / names[-2], path.parent / names[-1]
    original = {p: p.read_bytes() for p in (corrupt, truncated, missing)}
    raw = bytearray(original[corrupt])
    raw[700] ^= 0xFF  # inside a token array: same size, only the checksum can tell
    corrupt.write_bytes(bytes(raw))
    truncated.write_bytes(original[truncated][:1500])
    missing.unlink()
    assert {_group(n) for n in (names[1], names[-1])} != {_group(names[-1])}  # several pack groups

    assert validate.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {corrupt.name}: sha256 differs" in out
    assert f"TRUNCATED {truncated.name}: 1500 of {len(original[truncated])} bytes" in out
    assert f"MISSING {missing.name}" in out and "3 broken" in out

    intact = {n: (path.parent / n).stat().st_mtime_ns for n in names if path.parent / n not in original}
    valid_before = {p.name: p.read_bytes() for p in (path.parent.parent / "valid").iterdir()}
    assert validate.main([str(path), "--repair", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"REPAIRED {p.name}" in out for p in original)
    assert all(p.read_bytes() == data_bytes for p, data_bytes in original.items())
    assert {n: (path.parent / n).stat().st_mtime_ns for n in intact} == intact  # only broken ones rewritten
    assert {p.name: p.read_bytes() for p in (path.parent.parent / "valid").iterdir()} == valid_before


def _group(name):
    return name.split("-")[1]


def test_repair_refuses_when_a_source_changed(data, tmp_path, capsys):
    path = copy_of(data, tmp_path)
    name = json.loads(path.read_text())["shards"][0]["name"]
    (path.parent / name).unlink()
    with open(tmp_path / "d" / "in" / "docs0.jsonl", "a") as f:
        f.write(json.dumps({"text": "appended later"}) + "\n")
    assert validate.main([str(path), "--repair", "--input", str(tmp_path / "d" / "in")]) == 1
    out = capsys.readouterr().out
    assert f"STILL BROKEN {name}: cannot repair: source " in out and "docs0.jsonl of pack group 0 changed" in out
    assert "repair incomplete, 1 of 1 problems remain" in out and "REPAIRED" not in out


def validate_cli(*argv):
    return subprocess.run([sys.executable, "-m", "data_prep.validate", *map(str, argv)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_repair_rebuilds_a_missing_doc_lengths_from_the_sources(data, tmp_path):
    path = copy_of(data, tmp_path)
    lengths = path.parent / "doc_lengths.npy"
    original = lengths.read_bytes()
    shards = {p.name: p.stat().st_mtime_ns for p in path.parent.glob("*.tar")}
    lengths.unlink()
    result = validate_cli(path, "--repair", "--workers", "1", "--input", tmp_path / "d" / "in")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MISSING doc_lengths.npy" in result.stdout and "REPAIRED doc_lengths.npy" in result.stdout
    assert result.stdout.strip().endswith("all 1 problems repaired; it validates clean")
    assert lengths.read_bytes() == original
    assert {p.name: p.stat().st_mtime_ns for p in path.parent.glob("*.tar")} == shards  # none rewritten


def test_repair_names_exactly_what_it_could_not_repair(data, tmp_path):
    path = copy_of(data, tmp_path)
    manifest = json.loads(path.read_text())
    shard_g1 = next(s["name"] for s in manifest["shards"] if _group(s["name"]) == "g000001")
    original = (path.parent / shard_g1).read_bytes()
    (path.parent / shard_g1).write_bytes(original[:-512])
    (path.parent / "doc_lengths.npy").unlink()
    (tmp_path / "d" / "in" / "docs0.jsonl").unlink()  # group 0's source: the lengths need every group
    result = validate_cli(path, "--repair", "--workers", "1", "--input", tmp_path / "d" / "in")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert f"REPAIRED {shard_g1}" in out and (path.parent / shard_g1).read_bytes() == original
    assert "STILL BROKEN doc_lengths.npy: cannot repair: source docs0.jsonl of pack group 0 is gone" in out
    assert out.strip().splitlines()[-1].endswith("repair incomplete, 1 of 2 problems remain (doc_lengths.npy)")
    assert "validates clean" not in out and not (path.parent / "doc_lengths.npy").exists()

    manifest["total_samples"] += 1  # the manifest itself is wrong: nothing to rebuild it from
    path.write_text(json.dumps(manifest))
    result = validate_cli(path, "--repair", "--workers", "1", "--input", tmp_path / "d" / "in")
    assert result.returncode == 1
    assert "STILL BROKEN manifest.json (totals): cannot repair: a problem of the manifest itself" in result.stdout


def test_validate_cli_exits_nonzero_and_names_the_shard(data, tmp_path):
    path = copy_of(data, tmp_path)
    name = json.loads(path.read_text())["shards"][2]["name"]
    (path.parent / name).write_bytes(b"not a tar")
    result = subprocess.run([sys.executable, "-m", "data_prep.validate", str(path)],
                            capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 1 and f"TRUNCATED {name}" in result.stdout


def test_stats_reports_lengths_and_long_fractions_and_saves_png(data, tmp_path, capsys):
    root, lengths = data
    path = str(root / "out" / "train" / "manifest.json")
    train = json.loads((root / "out" / "train" / "manifest.json").read_text())
    valid = json.loads((root / "out" / "valid" / "manifest.json").read_text())
    result = stats.main([path, "--block-size", "100", "--histogram", str(tmp_path / "h.png")])
    recorded = np.concatenate([np.load(root / "out" / s / "doc_lengths.npy") for s in ("train", "valid")])
    assert sorted(recorded.tolist()) == sorted(lengths)  # byte tokenizer: length = UTF-8 bytes
    assert result["documents"] == train["documents"] == len(result["lengths"])
    assert train["documents"] + valid["documents"] == len(lengths)
    assert result["document_tokens"] + result["documents"] - train["dropped_tokens"] == train["total_tokens"]
    own = result["lengths"]
    assert result["longer_than_block"] == pytest.approx((own > 100).mean())
    assert result["longer_than_seq_len"] == pytest.approx((own > 32).mean()) and 0 < result["longer_than_seq_len"] < 1
    assert result["percentiles"][50] == pytest.approx(np.percentile(own, 50))
    out = capsys.readouterr().out
    assert "> block 100:" in out and "> seq_len 32:" in out and "p99" in out
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
