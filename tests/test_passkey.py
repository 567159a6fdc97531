"""PassKey prompts and scoring (pipeline/evaluation/passkey.py) on fixed seeds, with byte, BPE and
SentencePiece tokenizers, and the PassKey training shards built from the same prompts
(data_prep/passkey.py): exact prompts, key positions at each depth, exact lengths, keys, scoring of
right / wrong / partial answers, and one clear error per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.passkey import main as passkey_main
from data_prep.passkey import passkey_document, write_passkey_shards
from pipeline.evaluation.codec import load_codec
from pipeline.evaluation.passkey import (FILLER_SENTENCES, TASK, PassKeyText, build_prompt, check_lengths, draw_keys,
                                         score_answer)

# The paper's prompt (arXiv 2404.09173 Fig. 10: key first, then the filler, then the question),
# 300 bytes: the filler is cut to the 55 bytes the fixed part leaves.
PAPER_300 = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there. The pass key is 12345. Remember it. 12345 is the pass key. The grass is "
    "green. The sky is blue. The sun is yellow What is the pass key? The pass key is"
)
# Landmark / LongLoRA's depth variant at 50 %: the key line at the sentence boundary nearest the middle.
DEPTH_HALF_300 = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there. The grass is green. The pass key is 12345. Remember it. 12345 is the pass "
    "key. The sky is blue. The sun is yellow What is the pass key? The pass key is"
)


@pytest.fixture(scope="module")
def byte_text() -> PassKeyText:
    return PassKeyText(load_codec("byte"))


def make_tokenizer(kind: str, folder: Path) -> str:
    """'byte', or a BPE tokenizer.json / SentencePiece model trained on text with PassKey phrases and digits."""
    if kind == "byte":
        return "byte"
    corpus = folder / "corpus" / "doc.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [TASK + "".join(FILLER_SENTENCES) + f" The pass key is {k}. Remember it. {k} is the pass key."
             + f" What is the pass key? The pass key is {k}." for k in rng.integers(10_000, 100_000, 40)]
    corpus.write_text("\n".join(lines) + "\n" + "\n".join(f"def alpha_{i}(beta): return beta * {i}" for i in range(40)))
    if kind == "bpe":
        from data_prep import train_tokenizer

        train_tokenizer.main(["--input", str(corpus.parent), "--vocab-size", "400", "--output",
                              str(folder / "tok.json"), "--no-progress"])
        return str(folder / "tok.json")
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=120,
                                   model_type="bpe", minloglevel=2)
    return str(folder / "sp.model")


def test_paper_prompt_and_depth_variant_are_exactly_the_standard_sentences(byte_text):
    assert byte_text.codec.decode(build_prompt(byte_text, 300, 0.0, "12345").ids) == PAPER_300
    assert byte_text.codec.decode(build_prompt(byte_text, 300, 0.5, "12345").ids) == DEPTH_HALF_300


def test_key_sits_at_the_sentence_boundary_nearest_each_depth(byte_text):
    """400 bytes leave 155 filler bytes; sentence starts at 0, 20, 37, 56, 68, 90, 110, 127, 146, 155."""
    expected = {0.0: 0, 0.25: 37, 0.5: 68, 0.75: 110, 1.0: 155}  # nearest to 0, 38.75, 77.5, 116.25, 155
    for depth, before in expected.items():
        p = build_prompt(byte_text, 400, depth, "12345")
        assert (p.filler_before, p.filler_after, len(p.ids)) == (before, 155 - before, 400), depth
        intro = len(" The pass key is")
        assert p.key_start == len(TASK) + before + intro, depth
        assert byte_text.codec.decode(p.ids[p.key_start - intro : p.key_start + 6]) == " The pass key is 12345"
        assert byte_text.codec.decode(p.answer_ids) == " 12345."


@pytest.mark.parametrize("kind", ["byte", "bpe", "sentencepiece"])
def test_prompts_have_exactly_the_requested_token_length_with_each_tokenizer(kind, tmp_path):
    text = PassKeyText(load_codec(make_tokenizer(kind, tmp_path)))
    for length in (text.fixed_length("70000") + 1, 500, 1537):
        for key in draw_keys(3, length, 4):
            for depth in (0.0, 0.3, 1.0):
                p = build_prompt(text, length, depth, key)
                assert len(p.ids) == length
                decoded = text.codec.decode(p.ids)
                assert decoded.startswith(TASK) and decoded.endswith(" What is the pass key? The pass key is")
                assert text.codec.decode(p.ids[p.key_start :]).lstrip().startswith(f"{key}. Remember it.")
                assert text.codec.decode(p.ids[: p.key_start]).endswith(" The pass key is")
                assert decoded.count(key) == 2  # the key line's two mentions, never the answer


def test_keys_are_random_five_digit_numbers_fixed_by_seed_and_length():
    assert draw_keys(0, 1024, 6) == ["87382", "95167", "75689", "44549", "30308", "98043"]
    assert draw_keys(0, 4096, 3) == ["77992", "80862", "86850"]  # another length, other keys
    assert draw_keys(1, 1024, 3) == ["69601", "19523", "48315"]
    keys = draw_keys(5, 2048, 2000)
    assert all(len(k) == 5 and k[0] != "0" for k in keys) and len(set(keys)) > 1900


def test_scoring_exact_match_of_the_first_integer():
    right = [" 12345.", "12345", " 12345 is the key", "\n12345\x00", " key 12345."]
    wrong = [" 1234.", " 123456", " 12346", "", " none", " 54321", " 12 345"]
    assert all(score_answer(a, "12345").exact for a in right)
    assert not any(score_answer(a, "12345").exact for a in wrong)
    partial = {" 12395": 4, " 1234": 4, " 123456": 5, " 54321": 1, " x": 0, " 92345": 4}
    assert {a: score_answer(a, "12345").digits for a in partial} == partial


def test_a_length_below_the_fixed_part_fails_with_one_clear_error(byte_text):
    fixed = byte_text.fixed_length("12345")
    build_prompt(byte_text, fixed, 0.5, "12345")  # no filler at all is still a prompt
    with pytest.raises(ValueError, match=rf"passkey length {fixed - 1} is below the prompt's fixed part: {fixed} "
                                         rf"tokens with tokenizer byte .* use lengths >= {fixed}"):
        build_prompt(byte_text, fixed - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="passkey length 100 is below"):
        check_lengths(byte_text, [4096, 100], {4096: ["12345"], 100: ["12345"]})
    with pytest.raises(ValueError, match=r"passkey depth 1.5: must be a fraction in \[0, 1\]"):
        build_prompt(byte_text, 400, 1.5, "12345")


def test_an_unknown_tokenizer_fails_with_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer 'gpt9' is neither 'byte' nor an existing file"):
        load_codec("gpt9")
    (tmp_path / "vocab.txt").write_text("a b c")
    with pytest.raises(ValueError, match=r"expected a \.json \(HF tokenizers\) or \.model \(SentencePiece\)"):
        load_codec(str(tmp_path / "vocab.txt"))


# ---------------------------------------------------------------- training shards (data_prep/passkey.py)


def test_passkey_shards_hold_one_document_per_sample_ending_in_its_answer(tmp_path):
    from pipeline.data.loader import ShardLoader

    manifest = write_passkey_shards("byte", 300, 40, str(tmp_path / "a"), seed=3, samples_per_shard=16)
    loader = ShardLoader(manifest, 4, 300, shuffle=False)
    rows = np.concatenate([loader.read_shard(i)[1] for i in range(3)])  # 16 + 16 + 8 samples
    text = PassKeyText(load_codec("byte"))
    assert rows.shape == (40, 301) and (rows[:, -1] == 0).all() and (rows[:, :-1] != 0).all()  # EOD last, only
    depths = []
    for i, row in enumerate(rows):
        ids, key, depth = passkey_document(text, 300, 3, i, 0.0, 1.0)
        assert row[:-1].tolist() == ids.tolist()
        decoded = bytes(row[:-1].astype(np.uint8)).decode()
        assert decoded.endswith(f"What is the pass key? The pass key is {key}.") and decoded.count(key) == 3
        depths.append(depth)
    assert min(depths) < 0.1 and max(depths) > 0.9  # keys both near the question and far from it
    again = write_passkey_shards("byte", 300, 40, str(tmp_path / "b"), seed=3, samples_per_shard=16)
    assert Path(manifest).read_bytes() == Path(again).read_bytes()  # a pure function of the arguments
    info = json.loads(Path(manifest).read_text())
    assert info["tokenizer"]["spec"] == "byte" and info["total_samples"] == 40 and info["seq_len"] == 300


def test_passkey_shards_refuse_a_sequence_too_short_for_one_document(tmp_path, capsys):
    from data_prep.cli import run_main

    code = run_main(passkey_main, ["--tokenizer", "byte", "--seq-len", "200", "--samples", "4", "--output",
                                   str(tmp_path)], prog="python -m data_prep.passkey")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and not (tmp_path / "train").exists()
    assert "passkey length 200 is below the prompt's fixed part: 252 tokens" in err and "(--seq-len)" in err
