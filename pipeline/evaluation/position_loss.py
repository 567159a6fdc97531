"""Mean token loss by position over long held-out sequences (issue 15 item 3).

    seqs = held_out_sequences("data/x/valid/manifest.json", length=65536, count=4)   # [n, L + 1]
    result = run_position_loss(model, seqs, bucket_edges(65536, 32), chunk_tokens=4096)

The standard check that a model uses context beyond its window (research/eval-and-export.md §3):
the loss at position p, averaged over sequences, should keep falling past BSWA's receptive field
for a model with working memory, and flatten there for one without. For FAM and BSWA the
sequence is streamed `chunk_tokens` at a time through the model's forward with its state carried
(the same function as one call over the whole sequence: model/language_model.py), so memory is
O(chunk) whatever the length; only per-bucket sums are kept. Dense attention keeps no streaming
state: its sequence goes through in one call.

Held-out sequences: the manifest's samples in stored order, concatenated and cut into L + 1
tokens. The sharder packs each pack group's documents into one stream cut into consecutive
samples (data_prep/pack.py), so consecutive samples continue the same text; a new pack group
starts a new stream, which reads like one more document boundary (samples cross those anyway).

Receptive field of BSWA (arXiv 2404.09173 §2.1, Fig. 1d): layers x (m + 1) x C tokens; an output
of a model without FAM cannot depend on a token further back.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F_

from pipeline.data.loader import ShardLoader, manifest_info


def receptive_field(model_config) -> int | None:
    """layers x (m + 1) x C, BSWA's receptive field in tokens; None for dense attention."""
    c = model_config
    if c.attention == "dense":
        return None
    return c.num_layers * (c.mem_blocks + 1) * c.block_size


def bucket_edges(length: int, buckets: int, spacing: str = "log") -> list[int]:
    """Edges e_0 = 0 < ... < e_n = length of at most `buckets` position buckets [e_i, e_i+1).
    log: geometric from position 1 (position 0, with no context, is a bucket of its own), the
    usual axis for context curves; linear: equal widths. Edges that round alike merge."""
    if length < 1 or buckets < 1:
        raise ValueError(f"position-loss length={length} and buckets={buckets}: both must be >= 1")
    if spacing == "log":
        inner = np.geomspace(1, length, buckets)[:-1] if buckets > 1 else np.array([])
    elif spacing == "linear":
        inner = np.linspace(0, length, buckets + 1)[1:-1]
    else:
        raise ValueError(f"position-loss spacing={spacing!r}: must be log or linear")
    edges = {0, length} | {int(round(e)) for e in inner}
    return sorted(e for e in edges if 0 <= e <= length)


def held_out_sequences(manifest: str, length: int, count: int, vocab_size: int | None = None) -> torch.Tensor:
    """`count` sequences [n, length + 1] (long) from the manifest's samples in stored order
    (fewer if the split holds fewer tokens, at least one or a ValueError naming the manifest)."""
    info = manifest_info(manifest)
    if vocab_size is not None and info["vocab_size"] > vocab_size:
        raise ValueError(f"position-loss data {manifest} holds token ids up to {info['vocab_size'] - 1} but the "
                         f"model's vocabulary is {vocab_size}: use held-out data of the model's tokenizer")
    need = count * (length + 1)
    loader = ShardLoader(manifest, 1, info["seq_len"], shuffle=False)
    parts, have = [], 0
    for shard in range(len(loader.manifest["shards"])):
        rows = loader.read_shard(shard)[1].reshape(-1)
        parts.append(rows[: need - have])
        have += len(parts[-1])
        if have >= need:
            break
    n = have // (length + 1)
    if n == 0:
        raise ValueError(f"position-loss data {manifest} holds {have} tokens, fewer than one sequence of "
                         f"length + 1 = {length + 1}; shard more held-out text (e.g. a larger --valid-fraction) "
                         "or use a shorter length")
    stream = np.concatenate(parts)[: n * (length + 1)]
    return torch.from_numpy(stream.astype(np.int64)).view(n, length + 1)


def run_position_loss(model, sequences: torch.Tensor, edges: list[int], chunk_tokens: int, batch_size: int = 4,
                      autocast=contextlib.nullcontext) -> dict:
    """Mean loss (nats) per position bucket of sequences [n, L + 1] (inputs [:, :L], labels [:, 1:])."""
    cfg = model.config
    length = sequences.shape[1] - 1
    if edges[0] != 0 or edges[-1] != length:
        raise ValueError(f"bucket edges {edges[:3]}..{edges[-1:]} must run from 0 to the length {length}")
    if cfg.attention != "dense" and chunk_tokens % cfg.block_size:
        raise ValueError(f"position-loss chunk_tokens={chunk_tokens}: must be a multiple of the model's "
                         f"block_size={cfg.block_size} (the state is carried across whole blocks)")
    chunk = length if cfg.attention == "dense" else chunk_tokens
    sums = torch.zeros(length, dtype=torch.float64)  # loss summed over sequences, per position
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, sequences.shape[0], batch_size):
            sums += _sequence_losses(model, sequences[lo : lo + batch_size], chunk, autocast)
    finally:
        model.train(was_training)
    bucket = torch.bucketize(torch.arange(length), torch.tensor(edges[1:-1]), right=True)  # [L]
    totals = torch.zeros(len(edges) - 1, dtype=torch.float64).index_add_(0, bucket, sums)
    widths = torch.tensor(np.diff(edges), dtype=torch.float64)
    means = (totals / (widths * sequences.shape[0])).tolist()
    return {"length": length, "sequences": int(sequences.shape[0]), "receptive_field": receptive_field(cfg),
            "buckets": [{"start": a, "end": b, "loss": m} for a, b, m in zip(edges[:-1], edges[1:], means)]}


@torch.no_grad()
def _sequence_losses(model, batch: torch.Tensor, chunk: int, autocast) -> torch.Tensor:
    """Per-position loss summed over the batch [L] (float64), streamed chunk by chunk."""
    device = model.embedding.weight.device
    batch = batch.to(device)
    length = batch.shape[1] - 1
    out, state = torch.zeros(length, dtype=torch.float64), None
    for lo in range(0, length, chunk):
        hi = min(lo + chunk, length)
        tokens, labels = batch[:, lo:hi], batch[:, lo + 1 : hi + 1]
        with autocast():
            step = model(tokens, state=state)
        losses = F_.cross_entropy(step.logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        out[lo:hi] = losses.view(labels.shape).sum(0).double().cpu()
        state = None if model.config.attention == "dense" else step.state
    return out
