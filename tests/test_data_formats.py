"""data_prep input formats and bad input: every reader, end to end through the real sharder.

Files are written by the test with the real libraries (gzip, pyarrow's zstd codec and
Parquet writer, Arrow IPC streams laid out as `datasets.save_to_disk` lays them out, and,
where the `datasets` package is installed, `save_to_disk` itself).
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import corpus, shard

TEXTS = [f"document {i}: " + " ".join(["fam", "memory", "naïve", "日本"][j % 4] for j in range(i % 17 + 3))
         for i in range(40)]


def jsonl_bytes(texts, field="text"):
    return b"".join(json.dumps({field: t, "n": i}).encode() + b"\n" for i, t in enumerate(texts))


def write_zst(path, data: bytes):
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write(data)


def save_like_datasets(folder, texts, num_shards=2):
    """The layout datasets 5.x `save_to_disk` writes: Arrow IPC streams + state.json (checked
    against datasets 5.2.0), plus a stray cache file that must not be read."""
    folder.mkdir(parents=True)
    names = []
    for k, part in enumerate(np.array_split(np.array(texts, dtype=object), num_shards)):
        names.append(f"data-{k:05d}-of-{num_shards:05d}.arrow")
        table = pa.table({"text": pa.array(list(part), pa.string()), "id": list(range(len(part)))})
        with pa.OSFile(str(folder / names[-1]), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table, max_chunksize=7)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_split": None}))
    (folder / "dataset_info.json").write_text("{}")
    stray = pa.table({"text": ["NOT A DOCUMENT"]})
    with pa.OSFile(str(folder / "cache-123.arrow"), "wb") as f, pa.ipc.new_stream(f, stray.schema) as w:
        w.write_table(stray)
    return folder


def texts_of(folder, text_field="text"):
    return [t for s in corpus.list_sources(str(folder)) for _, t in corpus.iter_documents(s, text_field)]


def run_shard(input_spec, output, *extra):
    """Shard with the byte tokenizer; return the manifest paths by split."""
    shard.main(["--input", str(input_spec), "--tokenizer", "byte", "--seq-len", "32",
                       "--output", str(output), "--samples-per-shard", "8", "--valid-fraction", "0.2",
                       "--no-progress", *map(str, extra)])
    return {split: str(output / split / "manifest.json") for split in ("train", "valid")}


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow-file", "hf-save-to-disk"])
def test_each_format_yields_every_document_in_order(tmp_path, fmt):
    folder = tmp_path / "in"
    folder.mkdir()
    data = jsonl_bytes(TEXTS)
    if fmt == "jsonl":
        (folder / "a.jsonl").write_bytes(data)
    elif fmt == "jsonl.gz":
        (folder / "a.jsonl.gz").write_bytes(gzip.compress(data))
    elif fmt == "jsonl.zst":
        write_zst(folder / "a.jsonl.zst", data)
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))}), folder / "a.parquet",
                       row_group_size=9)  # several row groups: streamed one at a time
    elif fmt == "arrow-file":
        table = pa.table({"text": TEXTS})
        with pa.OSFile(str(folder / "a.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table, max_chunksize=5)
    else:
        save_like_datasets(folder / "ds", TEXTS)
    assert texts_of(folder) == TEXTS
    sources = corpus.list_sources(str(folder))
    ids = [doc_id for s in sources for doc_id, _ in corpus.iter_documents(s)]
    assert len(set(ids)) == len(TEXTS)  # ids decide the split: they must be unique

    manifests = run_shard(folder, tmp_path / "out")
    documents = sum(json.load(open(manifests[s]))["documents"] for s in ("train", "valid"))
    assert documents == len(TEXTS)
    source_digests = {s["name"]: s["sha256"] for s in json.load(open(manifests["train"]))["sources"]}
    import hashlib
    for s in sources:  # the recorded checksum is of the file as stored (compressed or not)
        assert source_digests[s.name] == hashlib.sha256(open(s.path, "rb").read()).hexdigest()


def test_real_datasets_save_to_disk_is_read_without_the_package(tmp_path):
    import datasets  # a pinned requirement: the real save_to_disk layout
    ds = datasets.Dataset.from_dict({"text": TEXTS + [None, ""], "id": list(range(len(TEXTS) + 2))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    assert texts_of(tmp_path / "ds") == TEXTS  # null and empty rows are skipped


def test_text_field_option_reads_another_field_or_column(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl_bytes(TEXTS[:5], field="content"))
    pq.write_table(pa.table({"content": TEXTS[5:9]}), tmp_path / "in" / "b.parquet")
    assert texts_of(tmp_path / "in", text_field="content") == TEXTS[:9]


# -- bad input ----------------------------------------------------------------------------

def test_missing_field_or_column_names_the_file_and_line(tmp_path):
    (tmp_path / "j").mkdir()
    write_zst(tmp_path / "j" / "a.jsonl.zst", jsonl_bytes(TEXTS[:3]) + b'{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl\.zst:4: no 'text' field \(found \['body'\]\); pass --text-field"):
        run_shard(tmp_path / "j", tmp_path / "out1")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "p" / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text' \(found \['body'\]\)"):
        run_shard(tmp_path / "p", tmp_path / "out2")
    pq.write_table(pa.table({"text": list(range(3))}), tmp_path / "p" / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet: column 'text' is int64, not a string column"):
        run_shard(tmp_path / "p", tmp_path / "out3")
    for out in ("out1", "out2", "out3"):
        assert not (tmp_path / out / "train" / "manifest.json").exists()


def test_bad_utf8_fails_with_location_or_is_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    good = jsonl_bytes(TEXTS)
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress(good + b'{"text": "bad \xff byte"}\n'
                                                              + b'{"text": "lone \\ud800 surrogate"}\n'))
    (tmp_path / "in" / "b.txt").write_bytes(b"ok text \xc3\x28 broken")
    (tmp_path / "in" / "c.txt").write_text(" ".join(TEXTS))
    with pytest.raises(ValueError, match=r"a\.jsonl\.gz:41 \(byte 14 of the line\): not valid UTF-8 "
                                         r"\(pass --on-bad-utf8 skip"):
        run_shard(tmp_path / "in", tmp_path / "fail")
    assert not (tmp_path / "fail" / "train" / "manifest.json").exists()  # nothing partial is listed

    manifests = run_shard(tmp_path / "in", tmp_path / "skip", "--on-bad-utf8", "skip")
    train = json.load(open(manifests["train"]))
    assert train["skipped_documents"] == {"bad_utf8": 3, "bad_json": 0}
    assert json.load(open(manifests["valid"]))["skipped_documents"] == {"bad_utf8": 0, "bad_json": 0}
    assert sum(json.load(open(manifests[s]))["documents"] for s in ("train", "valid")) == len(TEXTS) + 1
    err = capsys.readouterr().err
    assert "a.jsonl.gz:41" in err and "a.jsonl.gz:42" in err and "lone surrogate" in err
    assert "b.txt: byte 8: not valid UTF-8" in err


def test_empty_input_fails_clearly(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n\n")
    (tmp_path / "in" / "b.txt").write_text("")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "in" / "c.parquet")
    with pytest.raises(ValueError, match=r"no documents in input '.*in': its 3 files hold only empty texts "
                                         r"\(0 skipped as bad UTF-8, 0 as bad JSON\); check --input and --text-field"):
        run_shard(tmp_path / "in", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out" / "train" / "manifest.json")


def test_skipped_documents_are_counted_in_the_split_they_belong_to(tmp_path):
    """Each skip is counted once, in the manifest of the split its document id hashes to."""
    by_split = {split: [] for split in corpus.SPLITS}
    for line in range(1, len(TEXTS) + 1):
        by_split[corpus.split_of(f"a.jsonl:{line}", 0.2)].append(line)
    bad = {by_split["train"][0], by_split["train"][5], by_split["valid"][0]}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"".join(
        b'{"text": "bad \xff"}\n' if line in bad else jsonl_bytes([text])
        for line, text in enumerate(TEXTS, start=1)))
    manifests = run_shard(tmp_path / "in", tmp_path / "out", "--on-bad-utf8", "skip")
    for split, count in (("train", 2), ("valid", 1)):
        manifest = json.load(open(manifests[split]))
        assert manifest["skipped_documents"]["bad_utf8"] == count
        assert manifest["documents"] == len(by_split[split]) - count
