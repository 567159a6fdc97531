"""Special tokens written in a document are text: the EOD id comes only from the packer.

Any web page can contain `<|endoftext|>`; if the tokenizer parsed it as its special token,
the document would carry a forged boundary. Checked on real tokenizers (a BPE trained by
`data_prep.train_tokenizer`, a SentencePiece model, HF WordLevel vocabularies built with
the `tokenizers` library), on the single, batch and stream encode paths, and end to end
through the sharder's tar files, inline and with worker processes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep import corpus, shard
from data_prep.encode import Encoder
from data_prep.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FORGERIES = ["<|endoftext|>", "</s>", "<s>", "<unk>", "<|endoftext|><|endoftext|>"]


def document(i: int) -> str:
    forged = FORGERIES[i % len(FORGERIES)]
    return f"doc {i} says{forged}then more text {i * 7} and{forged}" + " words" * (i % 5)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer.json with <|endoftext|> as EOD, trained by our own command."""
    from data_prep import train_tokenizer

    folder = tmp_path_factory.mktemp("bpe")
    (folder / "in").mkdir()
    (folder / "in" / "a.txt").write_text(" ".join(document(i) for i in range(200)))
    train_tokenizer.main(["--input", str(folder / "in"), "--vocab-size", "300",
                          "--output", str(folder / "tok.json"), "--no-progress"])
    return str(folder / "tok.json")


def raw_hf(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def test_special_token_text_encodes_as_text_on_every_hf_path(bpe):
    tok = load_tokenizer(bpe)
    text = "A<|endoftext|>B"
    single = tok.encode(text)
    batch = tok.encode_batch([text, "x"])[0]
    stream, lengths = tok.encode_stream([text, "x"])
    assert tok.eod_id == 0 and tok.eod_id not in single
    assert single == batch == stream[: lengths[0]].tolist()
    assert np.flatnonzero(stream == tok.eod_id).tolist() == [lengths[0], lengths[0] + 1 + lengths[1]]
    assert raw_hf(bpe).decode(single, skip_special_tokens=False) == text  # still the same text


def test_sentencepiece_never_matches_its_control_symbols_in_text(tmp_path):
    """SentencePiece already treats control symbols in text as text; this pins it, and that a
    model whose eos piece is not a control symbol is refused (its eos_id reads -1)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    (tmp_path / "in.txt").write_text("\n".join(document(i) for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "in.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=120, minloglevel=2, user_defined_symbols=["<|user|>"])
    sp = load_tokenizer(str(tmp_path / "sp.model"))
    texts = ["a</s>b<s>c<unk>d", "</s>", "<|user|> is user-defined, </s> is control"]
    single = [sp.encode(t) for t in texts]
    stream, lengths = sp.encode_stream(texts)
    assert all(sp.eod_id not in ids for ids in single) and sp.encode_batch(texts) == single
    assert int(np.count_nonzero(stream == sp.eod_id)) == len(texts)

    proto = model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "sp.model").read_bytes())
    assert proto.pieces[sp.eod_id].piece == "</s>"
    proto.pieces[sp.eod_id].type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    (tmp_path / "ud.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match=r"ud\.model has no eos piece"):
        load_tokenizer(str(tmp_path / "ud.model"))


def word_level(path: Path, normalize_eos_from: str | None = None) -> str:
    """A WordLevel tokenizer.json whose vocabulary holds `</s>` (EOD) as a plain word."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"</s>": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    if normalize_eos_from:  # the literal `</s>` is blanked, another spelling becomes it
        tok.normalizer = normalizers.Sequence([normalizers.Replace("</s>", " "),
                                               normalizers.Replace(normalize_eos_from, "</s>")])
    tok.save(str(path))
    return str(path)


def test_a_tokenizer_that_maps_the_eod_text_to_eod_anyway_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"plain\.json encodes the text '</s>' to its end-of-document id 0"):
        load_tokenizer(word_level(tmp_path / "plain.json"))


def read_stream(split_dir: Path) -> np.ndarray:
    manifest = json.loads((split_dir / "manifest.json").read_text())
    rows = []
    for entry in manifest["shards"]:
        with tarfile.open(split_dir / entry["name"]) as tar:
            rows += [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()]
    return np.concatenate(rows)


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_stream_splits_at_eod_into_exactly_the_documents(tmp_path, bpe, workers):
    docs = [document(i) for i in range(80)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shard.main(["--input", str(tmp_path / "in"), "--tokenizer", bpe, "--seq-len", "64",
                "--output", str(tmp_path / "out"), "--valid-fraction", "0.25", "--workers", str(workers),
                "--no-progress"])
    hf = raw_hf(bpe)
    for split in corpus.SPLITS:
        expected = [d for line, d in enumerate(docs, 1) if corpus.split_of(f"a.jsonl:{line}", 0.25) == split]
        stream = read_stream(tmp_path / "out" / split)
        pieces = np.split(stream, np.flatnonzero(stream == 0) + 1)[:-1]  # the last one is cut off
        decoded = [hf.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]
        assert len(decoded) > 3 and decoded == expected[: len(decoded)]


@pytest.mark.parametrize("workers", ["1", "2"])  # inline, and in worker processes
def test_a_document_that_still_encodes_to_eod_stops_the_run_naming_its_line(tmp_path, workers):
    """A tokenizer that passes the load check (its normalizer blanks the literal `</s>`) but turns
    another spelling into EOD: the stream check in the worker stops the run at that line."""
    sneaky = word_level(tmp_path / "sneaky.json", normalize_eos_from="@@EOS@@")
    (tmp_path / "in").mkdir()
    lines = ["hello world " * 4 + ("@@EOS@@" if i == 250 else "") for i in range(1, 301)]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    result = subprocess.run([sys.executable, "-m", "data_prep.shard", "--input", str(tmp_path / "in"),
                             "--tokenizer", sneaky, "--seq-len", "16", "--output", str(tmp_path / "out"),
                             "--workers", workers, "--no-progress"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path / 'in' / 'a.jsonl'}:250: tokenizer {sneaky} encoded text of this document to its " \
           "end-of-document id 0" in result.stderr
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()


def test_a_worker_whose_tokenizer_fails_to_load_raises_instead_of_restarting_forever(tmp_path, bpe):
    shutil.copy(bpe, tmp_path / "tok.json")
    tok = load_tokenizer(str(tmp_path / "tok.json"))
    os.remove(tmp_path / "tok.json")  # the workers, started next, cannot load it
    with Encoder(tok, workers=2) as encoder:
        handle = encoder.submit(["hello"])
        # A spawned worker starts in ~1 s; 60 s is the bound even on a busy 2-core machine.
        # Before the fix the Pool restarted the failing worker forever and this timed out.
        with pytest.raises(ValueError, match=r"tok\.json' is neither 'byte' nor an existing file"):
            handle.get(timeout=60)
