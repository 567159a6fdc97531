"""Streaming generation (model/generation/) against the model's own forward: the decode path's
teacher-forced logits, its O(1) state, greedy decoding, sampling and its top-k / top-p cuts."""

from __future__ import annotations

import math

import pytest
import torch

from model import FAMGenerator, Sampling, build_model, generate
from model.generation import LayerCache, next_token_probs
from model.generation.generator import PAD
from tests.test_reference import small_args

# fp32. The decode path computes the same function as one forward call in another order (one
# query row at a time over the cache window vs all blocks under one mask; the FAM keys through
# project_qkv vs inside fam_step): measured 2-3e-7 of the largest logit here. 2e-5 (as in
# test_model.py) leaves 100x for rounding while a FAM bug shows at 3e-4 to 1e-1: the FAM keys
# one position off gave 3e-4, the FAM visible one token late 3e-2 (checked below).
RTOL = 2e-5
VOCAB = 64  # small_args' vocabulary


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= RTOL * b.abs().max().item()


def make_model(**kw):
    torch.manual_seed(0)
    return build_model(small_args(num_layers=3, **kw))  # C = 8, F = 4, m = 2, 4 heads in 2 groups


def teacher_forced(model, tokens: torch.Tensor, prefix: int, prefill_chunk_blocks: int = 8) -> torch.Tensor:
    """Logits [b, s - prefix + 1, V]: prefill tokens[:, :prefix], then feed the rest one at a time."""
    gen = FAMGenerator(model, prefill_chunk_blocks)
    logits = [gen.prefill(tokens[:, :prefix])]
    for i in range(prefix, tokens.shape[1]):
        logits.append(gen.step(tokens[:, i]))
    return torch.stack(logits, 1)


def one_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


ARCHITECTURES = {
    "fam": {},
    "fam_no_memory": {"mem_blocks": 0},
    "fam_multi_query": {"num_query_groups": 1},
    "fam_equals_block": {"fam_len": 8},
    "bswa": {"fam_len": 0},
    "bswa_no_memory": {"fam_len": 0, "mem_blocks": 0},
    "dense": {"attention": "dense", "fam_len": 0},
}
PREFIXES = {
    "mid_block": (13, 8),  # one whole block through the forward, 5 tokens through the decode path
    "shorter_than_a_block": (5, 8),  # the soft-prompt stream and the zero-residual first update in decode
    "whole_blocks_in_chunks": (24, 1),  # three forward calls of one block each, carrying the state
}


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_teacher_forced_decode_logits_equal_one_forward_call(arch, prefix):
    """45 tokens, C = 8: the decode path crosses 4-5 block boundaries and ends mid-block."""
    length, chunk = PREFIXES[prefix]
    model = make_model(**ARCHITECTURES[arch])
    tokens = torch.randint(0, VOCAB, (2, 45))
    assert close(teacher_forced(model, tokens, length, chunk), one_forward(model, tokens)[:, length - 1 :])


@pytest.mark.parametrize("prefix", [13, 5])
def test_teacher_forcing_detects_the_fam_seen_one_token_late(prefix, monkeypatch):
    """The comparison above can fail: the first token of each block reading the previous FAM's
    keys (the update one token late) is caught, far beyond the tolerance."""
    set_fam, append = LayerCache.set_fam, LayerCache.append

    def late_set_fam(self, fam, fam_k, fam_v):
        if self.fam is None:  # the initial FAM: no earlier one to show instead
            return set_fam(self, fam, fam_k, fam_v)
        self.fam, self.late = fam, (fam_k, fam_v)

    def late_append(self, k, v):
        first = self.filled == 0
        append(self, k, v)
        if getattr(self, "late", None) is not None and not first:
            self.k[self.mem_rows : self.block_start_row], self.v[self.mem_rows : self.block_start_row] = self.late
            self.late = None

    monkeypatch.setattr(LayerCache, "set_fam", late_set_fam)
    monkeypatch.setattr(LayerCache, "append", late_append)
    model = make_model()
    tokens = torch.randint(0, VOCAB, (2, 45))
    error = (teacher_forced(model, tokens, prefix) - one_forward(model, tokens)[:, prefix - 1 :]).abs().max()
    assert error > 100 * RTOL * one_forward(model, tokens).abs().max()


def state_shapes_and_bytes(gen: FAMGenerator):
    return [tuple(t.shape) for c in gen.state.layers for t in c.tensors()], gen.state.nbytes()


@pytest.mark.parametrize("arch", ["fam", "bswa"])
def test_state_size_does_not_grow_with_generated_tokens(arch):
    """After 1 block and after 5 blocks of decoding: the same tensors, of the size the window
    formula gives (m*C + F + C key and value rows per layer, plus the FAM)."""
    args = small_args(num_layers=3, **ARCHITECTURES[arch])
    model = make_model(**ARCHITECTURES[arch])
    b, C = 2, args.block_size
    gen = FAMGenerator(model)
    gen.prefill(torch.randint(0, VOCAB, (b, 3)))
    sizes = []
    for blocks in (1, 4):
        for token in torch.randint(0, VOCAB, (blocks * C, b)):
            gen.step(token)
        sizes.append(state_shapes_and_bytes(gen))
    rows = args.mem_blocks * C + args.fam_len + C
    per_layer = 2 * rows * args.query_groups * args.head_dim + args.fam_len * args.hidden_size  # K, V; FAM
    expected = args.num_layers * b * per_layer * 4  # fp32
    assert sizes[0] == sizes[1]
    assert sizes[1][1] == expected
    assert gen.state.layers[0].mem_len == args.mem_blocks * C  # the memory is full, not just allocated


def test_dense_kv_cache_grows_with_generated_tokens():
    """Dense attention keeps every token's K/V: the size measure above does see growth."""
    gen = FAMGenerator(make_model(**ARCHITECTURES["dense"]))
    gen.prefill(torch.randint(0, VOCAB, (2, 3)))
    sizes = []
    for steps in (8, 32):
        for token in torch.randint(0, VOCAB, (steps, 2)):
            gen.step(token)
        sizes.append(gen.state.nbytes())
    assert sizes[1] > sizes[0]


@pytest.mark.parametrize("arch", ["fam", "bswa", "dense"])
def test_greedy_generation_equals_argmax_of_the_full_forward_step_by_step(arch):
    model = make_model(**ARCHITECTURES[arch])
    prompt = torch.randint(0, VOCAB, (2, 11))
    out = generate(model, prompt, max_new_tokens=20)
    tokens = prompt
    for _ in range(20):
        tokens = torch.cat([tokens, one_forward(model, tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.tokens, tokens[:, 11:])
    assert out.lengths.tolist() == [20, 20]
    assert generate(model, prompt, max_new_tokens=0).tokens.shape == (2, 0)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = make_model()
    prompt = torch.randint(0, VOCAB, (2, 6))
    sampling = Sampling(temperature=1.0, top_k=40, top_p=0.95)

    def draw(seed):
        return generate(model, prompt, 24, sampling, generator=torch.Generator().manual_seed(seed)).tokens

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))  # 48 draws from ~40 nearly equal tokens


def test_stop_token_ends_each_sequence_and_then_the_batch():
    model = make_model()
    prompt = torch.randint(0, VOCAB, (2, 11))
    free = generate(model, prompt, max_new_tokens=20).tokens
    stop = free[0, 3].item()
    first = [row.tolist().index(stop) if stop in row.tolist() else None for row in free]
    out = generate(model, prompt, max_new_tokens=20, stop_tokens=[stop])
    assert out.lengths[0].item() == first[0] + 1
    assert torch.equal(out.tokens[0, : first[0] + 1], free[0, : first[0] + 1])
    assert (out.tokens[0, first[0] + 1 :] == PAD).all()
    expected_1 = 20 if first[1] is None else first[1] + 1
    assert out.lengths[1].item() == expected_1
    assert out.tokens.shape[1] == max(first[0] + 1, expected_1)  # stops once every sequence has


# ---------------------------------------------------------------- sampling semantics

PROBS = [0.05, 0.40, 0.10, 0.25, 0.20]  # a hand-made distribution over 5 tokens


def probs_after(**sampling) -> list[float]:
    logits = torch.tensor([PROBS]).log()
    return next_token_probs(logits, Sampling(**sampling))[0].tolist()


def test_top_k_top_p_and_temperature_keep_the_documented_tokens():
    assert probs_after(temperature=1.0) == pytest.approx(PROBS, abs=1e-6)
    top_two = [0, 0.40 / 0.65, 0, 0.25 / 0.65, 0]
    assert probs_after(temperature=1.0, top_k=2) == pytest.approx(top_two, abs=1e-6)
    # top-p 0.7: 0.40 + 0.25 = 0.65 < 0.7, so the 0.20 token is needed too (0.85 >= 0.7)
    top_three = [0, 0.40 / 0.85, 0, 0.25 / 0.85, 0.20 / 0.85]
    assert probs_after(temperature=1.0, top_p=0.7) == pytest.approx(top_three, abs=1e-6)
    assert probs_after(temperature=1.0, top_p=0.3) == pytest.approx([0, 1, 0, 0, 0], abs=1e-6)  # the top one stays
    # top-k first, then top-p on the renormalised top 3: 0.40/0.85 = 0.47 < 0.5, 0.76 >= 0.5
    assert probs_after(temperature=1.0, top_k=3, top_p=0.5) == pytest.approx(top_two, abs=1e-6)
    root = [math.sqrt(p) for p in PROBS]  # temperature 2 takes the square root of the probabilities
    assert probs_after(temperature=2.0) == pytest.approx([r / sum(root) for r in root], abs=1e-6)
    tied = next_token_probs(torch.tensor([[0.3, 0.3, 0.2, 0.2]]).log(), Sampling(temperature=1.0, top_k=3))
    assert tied[0].tolist() == pytest.approx([0.3, 0.3, 0.2, 0.2], abs=1e-6)  # ties with the k-th stay


def test_sampled_frequencies_follow_the_cut_distribution():
    from model.generation import choose_next

    logits = torch.tensor([PROBS]).log().expand(20000, -1)
    tokens = choose_next(logits, Sampling(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    # 20000 draws: a frequency's standard deviation is at most 0.0035, so 0.015 is > 4 sigma
    assert freq.tolist() == pytest.approx([0, 0.40 / 0.85, 0, 0.25 / 0.85, 0.20 / 0.85], abs=0.015)
    assert freq[0] == 0 and freq[2] == 0


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=0, temperature=1.0), "top_k=0"),
    (dict(top_p=0.0, temperature=1.0), "top_p=0.0"),
    (dict(top_p=1.5, temperature=1.0), "top_p=1.5"),
    (dict(top_k=5), "temperature=0"),
])
def test_bad_sampling_settings_raise_one_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**bad).validate()


def test_bad_prompts_and_calls_raise_one_clear_error():
    model = make_model()
    gen = FAMGenerator(model)
    with pytest.raises(RuntimeError, match="prefill"):
        gen.step(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="prompt: token id 64 is outside the vocabulary"):
        gen.prefill(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match=r"prompt: expected 2 dimensions"):
        gen.prefill(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        gen.prefill(torch.rand(1, 4))
    with pytest.raises(ValueError, match="empty"):
        gen.prefill(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="stop_tokens: token id -3"):
        gen.generate(torch.tensor([[1, 2]]), 4, stop_tokens=[-3])
    gen.prefill(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="batch 3 differs"):
        gen.step(torch.tensor([1, 2, 3]))
