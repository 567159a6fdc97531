"""pipeline.memory with micro-chunks (train.micro_chunk_len; pipeline/memory/estimate.py, issue 14).

Exact mode's saved boundary states equal the real states the CPU model hands across micro-chunks
(model/micro_chunks.py state_bytes), byte for byte; with offload_states they are counted in host
memory instead; truncated mode saves none. A micro-chunk's activation terms, checked against
autograd's saved tensors of a micro-chunk that continues from a state, within -1 %..+7 %. At one
sequence length the peak with micro-chunks does not grow with the sequence in truncated mode, and
in exact mode only by the saved states.
"""

from __future__ import annotations

import pytest
import torch

from model import build_model
from model.micro_chunks import _as_leaves, state_bytes
from pipeline.memory.estimate import Settings, estimate
from tests.test_memory import _predicted_saved, _small

CPU_FP32 = dict(dtype="fp32", kernels="cpu", precision="autocast")


def _state_after(args, batch: int, seq: int):
    torch.manual_seed(0)
    model = build_model(args, params_dtype=torch.float32, device="cpu")
    tokens = torch.randint(0, args.vocab_size, (batch, 2 * seq + 1))  # two micro-chunks of seq tokens
    with torch.no_grad():
        return model, tokens, model(tokens[:, :seq], labels=tokens[:, 1:seq + 1], return_logits=False).state


@pytest.mark.parametrize("over", [{}, {"fam_len": 0}, {"mem_blocks": 2}], ids=["fam", "bswa", "fam, m=2"])
def test_exact_mode_counts_the_real_boundary_states(over):
    args, batch, chunk, chunks = _small(**over), 2, 64, 5
    _, _, state = _state_after(args, batch, chunk)
    base = dict(micro_batch=batch, seq_len=chunk * chunks, micro_chunk_len=chunk, **CPU_FP32)
    exact = estimate(args, Settings(**base)).worst()
    assert exact.boundary_states == (chunks - 1) * state_bytes(state)
    assert exact.boundary_states_host == 0
    offloaded = estimate(args, Settings(**base, offload_states=True)).worst()
    assert (offloaded.boundary_states, offloaded.boundary_states_host) == (0, (chunks - 1) * state_bytes(state))
    assert offloaded.peak < exact.peak
    truncated = estimate(args, Settings(**base, micro_chunk_mode="truncated")).worst()
    assert truncated.boundary_states == truncated.boundary_states_host == 0


@pytest.mark.parametrize("over", [{}, {"fam_len": 0}], ids=["fam", "bswa"])
def test_a_micro_chunk_from_a_state_saves_what_the_estimate_says_within_7_percent(over):
    """Autograd's saved storages of micro-chunk 2 (from chunk 1's state, as leaves) against the
    estimator's per-chunk activations (layers, head, embedding, the state's keys)."""
    args, batch, chunk = _small(**over), 2, 64
    model, tokens, state = _state_after(args, batch, chunk)
    state = _as_leaves(state)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, chunk:2 * chunk], labels=tokens[:, chunk + 1:2 * chunk + 1], state=state,
              return_logits=False)
    got = sum(storages.values())
    est = estimate(args, Settings(micro_batch=batch, seq_len=4 * chunk, micro_chunk_len=chunk, **CPU_FP32))
    state_keys = est.worst().activations - estimate(args, Settings(micro_batch=batch, seq_len=chunk,
                                                                   **CPU_FP32)).worst().activations
    predicted = _predicted_saved(args, batch, chunk) + state_keys
    assert state_keys > 0
    # Measured: +6.3 % (FAM: a micro-chunk from a state skips the soft-prompt step that the terms
    # count, so the estimate errs high), -0.05 % (BSWA). Without the state's K/V: +5.2 %, -1.5 %.
    assert -0.01 <= (predicted - got) / got <= 0.07, (predicted, got)


def test_peak_grows_with_the_sequence_only_by_the_saved_states():
    args = _small()
    base = dict(micro_batch=1, micro_chunk_len=256, **CPU_FP32)
    short, long = (estimate(args, Settings(**base, seq_len=n)).worst() for n in (1024, 65536))
    assert long.peak - short.peak == long.boundary_states - short.boundary_states
    t_short, t_long = (estimate(args, Settings(**base, seq_len=n, micro_chunk_mode="truncated")).worst()
                       for n in (1024, 65536))
    assert t_long.peak == t_short.peak
    whole = estimate(args, Settings(micro_batch=1, seq_len=65536, **CPU_FP32)).worst()
    assert whole.peak > 4 * long.peak


def test_truncated_micro_chunks_under_pp_are_micro_batches_in_flight():
    args = _small(num_layers=4)
    base = dict(pp=2, micro_batch=1, seq_len=1024, microbatches=2, **CPU_FP32)
    one = estimate(args, Settings(**base)).ranks[0]
    chunked = estimate(args, Settings(**base, micro_chunk_len=256, micro_chunk_mode="truncated")).ranks[0]
    assert (one.in_flight, chunked.in_flight) == (2, 2)  # 1F1B: P - rank, at least that many micro-batches
    gpipe = estimate(args, Settings(**base, schedule="gpipe", micro_chunk_len=256,
                                    micro_chunk_mode="truncated")).ranks[0]
    assert gpipe.in_flight == 8  # 2 samples x 4 micro-chunks
