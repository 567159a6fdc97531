"""PassKey and loss by position run on a model (pipeline/evaluation/, the commands of
pipeline/evaluate.py as functions of a model): the streamed position-loss buckets equal a direct
computation from one forward call; the PassKey answers are the model's own greedy continuations,
scored; the commands write their JSON and pictures; bad input gets one clear error each."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F_

from model import build_model
from pipeline.evaluate import passkey_command, position_loss_command
from pipeline.evaluation.codec import load_codec
from pipeline.evaluation.passkey import PassKeyText, build_prompt, draw_keys, score_answer
from pipeline.evaluation.passkey_eval import PassKeySettings, prompt_length, run_passkey
from pipeline.evaluation.position_loss import bucket_edges, held_out_sequences, receptive_field, run_position_loss
from tests.test_reference import small_args

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# fp32. Streaming chunk by chunk computes the same function as one forward call (model/language_model.py,
# tests/test_model.py checks logits to 2e-5 relative); a bucket mean of ~5.5 nats then agrees to ~1e-6
# absolute (measured 3e-7). 1e-4 leaves 100x for rounding, while a position off by one token moves a
# bucket by ~1e-3 here and a dropped state (each chunk from scratch) by ~1e-2 (both checked red).
LOSS_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def byte_model(**kw):
    return build_model(small_args(vocab_size=256, **kw), seed=3)  # C = 8, F = 4, m = 2 unless kw says otherwise


def direct_bucket_losses(model, seqs: torch.Tensor, edges: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(seqs[:, :-1]).logits
    losses = F_.cross_entropy(logits.flatten(0, 1), seqs[:, 1:].flatten(), reduction="none").view(seqs.shape[0], -1)
    return [float(losses[:, a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("arch", [{}, {"mem_blocks": 0}, {"fam_len": 0}, {"attention": "dense", "fam_len": 0}])
def test_position_loss_buckets_equal_a_direct_computation(arch, shards):
    """Held-out samples of 65 tokens joined into sequences of 300 (several samples each); streamed in
    chunks of 24 (3 blocks) with a partial last chunk, in batches of 2 over 3 sequences (a partial batch)."""
    model = byte_model(**arch)
    seqs = held_out_sequences(str(shards / "valid" / "manifest.json"), 300, 3, vocab_size=256)
    assert seqs.shape == (3, 301)
    for edges in (bucket_edges(300, 7), bucket_edges(300, 5, "linear")):
        result = run_position_loss(model, seqs, edges, chunk_tokens=24, batch_size=2)
        streamed = [b["loss"] for b in result["buckets"]]
        assert streamed == pytest.approx(direct_bucket_losses(model, seqs, edges), abs=LOSS_ATOL)
        assert [(b["start"], b["end"]) for b in result["buckets"]] == list(zip(edges[:-1], edges[1:]))
    assert result["receptive_field"] == receptive_field(model.config)


def test_bucket_edges_and_held_out_sequences(shards):
    assert bucket_edges(1000, 4) == [0, 1, 10, 100, 1000]
    assert bucket_edges(100, 4, "linear") == [0, 25, 50, 75, 100]
    assert bucket_edges(5, 32) == [0, 1, 2, 3, 4, 5]  # edges that round alike merge
    assert receptive_field(small_args(num_layers=4, block_size=64, mem_blocks=0)) == 256  # L x (m+1) x C
    assert receptive_field(small_args(num_layers=2, block_size=8, mem_blocks=2)) == 48
    manifest = str(shards / "valid" / "manifest.json")
    stored = held_out_sequences(manifest, 64, 2)  # the samples themselves, in stored order
    joined = held_out_sequences(manifest, 129, 1)  # two consecutive samples make one sequence
    assert torch.equal(joined[0], stored.reshape(-1)[:130])
    with pytest.raises(ValueError, match=r"holds \d+ tokens, fewer than one sequence of length \+ 1 = 1000001"):
        held_out_sequences(manifest, 1_000_000, 1)
    with pytest.raises(ValueError, match="holds token ids up to 255 but the model's vocabulary is 64"):
        held_out_sequences(manifest, 64, 1, vocab_size=64)


@pytest.mark.parametrize("arch", [{}, {"fam_len": 0, "mem_blocks": 0}])
def test_passkey_answers_are_the_models_greedy_continuations_scored(arch):
    """Against a plain greedy loop that runs the whole prompt (and every token so far) through one
    forward call per new token: the streamed generation must give the same answers."""
    model = byte_model(**arch)
    codec = load_codec("byte")
    settings = PassKeySettings([260, 300], [0.0, 1.0], trials=3, seed=7, batch_size=2, chunk_tokens=16)
    results = run_passkey(model, codec, settings)
    assert [(c["length"], c["depth"]) for c in results["cells"]] == settings.grid()
    text = PassKeyText(codec)
    for cell in results["cells"]:
        keys = draw_keys(7, cell["length"], 3)
        prompts = [build_prompt(text, prompt_length(text, cell["length"], keys), cell["depth"], k) for k in keys]
        answers = [naive_greedy(model, p.ids, len(p.answer_ids) + 2) for p in prompts]
        assert [e["answer"] for e in cell["examples"]] == answers
        scores = [score_answer(a, p.key) for a, p in zip(answers, prompts)]
        assert cell["accuracy"] == sum(s.exact for s in scores) / 3
        assert cell["digit_accuracy"] == sum(s.digits for s in scores) / 15


def test_an_evaluation_prompt_is_a_training_documents_prompt_so_the_answer_sits_where_training_put_it():
    """At the training length, the prompt is data_prep/passkey.py's document without its answer:
    same tokens, so the answer's first token is at the same place in its block (a prompt of a whole
    number of blocks would start the answer in a fresh block, out of the question's sight at m = 0)."""
    from data_prep.passkey import passkey_document

    text = PassKeyText(load_codec("byte"))
    for index in range(5):
        ids, key, depth = passkey_document(text, 1024, 3, index, 0.0, 1.0)
        prompt = build_prompt(text, prompt_length(text, 1024, [key]), depth, key)
        assert list(ids) == prompt.ids + prompt.answer_ids and len(prompt.ids) == 1024 - len(prompt.answer_ids)


def naive_greedy(model, ids: list[int], new_tokens: int) -> str:
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            if token == 0:  # the byte tokenizer's end of document stops the answer
                break
            tokens.append(token)
    return load_codec("byte").decode(tokens[len(ids):])


def test_commands_write_json_and_pictures(shards, tmp_path):
    model = byte_model()
    results = passkey_command(model, "byte", PassKeySettings([256, 512], [0.0, 0.5, 1.0], 2, 0, 2, 64), tmp_path / "pk",
                              title="unit")
    saved = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert saved == json.loads(json.dumps(results)) and len(saved["cells"]) == 6 and saved["model"]["fam_len"] == 4
    assert (tmp_path / "pk" / "passkey_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    result = position_loss_command(model, str(shards / "valid" / "manifest.json"), 256, tmp_path / "pl", buckets=6,
                                   sequences=2, chunk_tokens=64, title="unit")
    assert json.loads((tmp_path / "pl" / "position_loss.json").read_text())["sequences"] == 2
    assert len(result["buckets"]) == 6 and (tmp_path / "pl" / "position_loss.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_evaluation_input_gets_one_clear_error_each(shards, tmp_path):
    model = byte_model()
    ok = dict(lengths=[300], depths=[0.5], trials=1, chunk_tokens=16)
    cases = [
        (dict(ok, lengths=[300, 200]), "passkey length 200 is below the prompt's fixed part: 245 tokens"),
        (dict(ok, depths=[0.5, -0.1]), r"passkey depth -0.1: must be a fraction in \[0, 1\]"),
        (dict(ok, chunk_tokens=12), "chunk_tokens=12: must be a multiple of the model's block_size=8"),
        (dict(ok, trials=0), "trials=0: must be >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            passkey_command(model, "byte", PassKeySettings(**kwargs), tmp_path / "x")
    with pytest.raises(ValueError, match="tokenizer 'bpe-32k' is neither 'byte' nor an existing file"):
        passkey_command(model, "bpe-32k", PassKeySettings(**ok), tmp_path / "x")
    with pytest.raises(ValueError, match="tokenizer byte has 256 ids but the model's vocabulary is 64"):
        passkey_command(build_model(small_args()), "byte", PassKeySettings(**ok), tmp_path / "x")
    with pytest.raises(ValueError, match="position-loss chunk_tokens=20: must be a multiple of the model's block_size"):
        position_loss_command(model, str(shards / "valid" / "manifest.json"), 64, tmp_path / "y", chunk_tokens=20)
    with pytest.raises(FileNotFoundError, match="manifest .*missing.json does not exist"):
        position_loss_command(model, str(tmp_path / "missing.json"), 64, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written on bad input
