"""Training batches mixed from several shard manifests in fixed proportions.

    loader = BlendLoader(["data/web/train/manifest.json", "data/code/train/manifest.json"],
                         weights=[0.7, 0.3], micro_batch_size=4, seq_len=512,
                         dp_rank=dp_rank, dp_world_size=dp_world_size, seed=1234)
    for batch in loader:   # infinite; batch["tokens"]: LongTensor [b, seq_len + 1]
        ...                # batch["keys"]: "<source index>:<sample key>" (sources may share key names)
    loader.realised_proportions()   # {manifest path: fraction of the samples handed out}
    ckpt["data"] = loader.state_dict();  loader.load_state_dict(ckpt["data"])

The same interface and data-parallel contract as `pipeline.data.loader.ShardLoader`: a global
sample sequence that depends on neither the micro batch nor the DP size; global step k is
positions [k*G, (k+1)*G), G = dp_world_size * micro_batch_size, and rank r takes
[k*G + r*b, k*G + (r+1)*b).

Which source fills global position p (why a fixed schedule, not random draws): positions
are cut into periods of BLEND_PERIOD. Each source gets a whole-number quota of a period,
its weight times the period, rounded by largest remainder (so a weight is realised to
within 0.5/BLEND_PERIOD, exactly at every period boundary). Inside a period, positions go
to the source furthest below its quota so far (megatron-core's BlendedDataset rule,
`build_blending_indices`), so every stretch of the sequence, and every global batch, is
close to the weights, with no sampling noise to wait out. Position p of source s is then
`(p // period) * quota[s] + (how often s came earlier in p's period)`: any position is
computed in O(1), so resume needs no replay.

Each source is an infinite stream in its own `ShardLoader` order (shards and samples
reshuffled each of its epochs, seeded by (seed, source index)); a small source simply
starts new epochs sooner. Decoded shards are cached per source (its last few), which
covers a shuffle window: each shard is read about once per source epoch on each rank.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator

import numpy as np
import torch

from pipeline.data.loader import WINDOW_SHARDS, ShardLoader

BLEND_PERIOD = 1000
_STATE_VERSION = 1
_CACHED_SHARDS = WINDOW_SHARDS + 2


def blend_schedule(weights: list[float], period: int = BLEND_PERIOD) -> tuple[np.ndarray, np.ndarray]:
    """(source of each position in a period [period], quota per source [n])."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    exact = w * period
    quota = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - quota), kind="stable")[: period - int(quota.sum())]:
        quota[i] += 1  # largest remainder
    counts = np.zeros(len(w), dtype=np.int64)
    sources = np.empty(period, dtype=np.int64)
    for k in range(period):
        deficit = quota * (k + 1) / period - counts
        deficit[counts >= quota] = -np.inf
        sources[k] = int(np.argmax(deficit))  # ties: the lowest index
        counts[sources[k]] += 1
    return sources, quota


class BlendLoader:
    """Infinite, resumable, data-parallel batches mixed from `manifests` by `weights`.
    `shard_options` go to every source's ShardLoader: shuffle (default True), verify_checksums."""

    def __init__(self, manifests: list[str], weights: list[float], micro_batch_size: int, seq_len: int,
                 dp_rank: int = 0, dp_world_size: int = 1, seed: int = 1234, **shard_options):
        if not manifests or len(manifests) != len(weights):
            raise ValueError(f"need one weight per manifest: got {len(manifests)} manifests and "
                             f"{len(weights)} weights")
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_world_size - 1}")
        self.manifest_paths, self.weights = list(manifests), [float(w) for w in weights]
        self.shuffle = shard_options.setdefault("shuffle", True)
        self.micro_batch_size, self.seq_len, self.seed = micro_batch_size, seq_len, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.global_batch_size = dp_world_size * micro_batch_size
        self._sources = [ShardLoader(path, 1, seq_len, seed=_source_seed(seed, i), **shard_options)
                         for i, path in enumerate(manifests)]
        self._check_same_tokenizer()
        self._period_sources, self._quota = blend_schedule(self.weights)
        if (self._quota == 0).any():
            small = [manifests[i] for i in np.flatnonzero(self._quota == 0)]
            raise ValueError(f"blend weights of {small} are below 1/{BLEND_PERIOD} of the total: "
                             "they would never be sampled")
        # prefix[k, s]: how often source s fills positions 0..k-1 of a period.
        onehot = np.eye(len(manifests), dtype=np.int64)[self._period_sources]
        self._prefix = np.vstack([np.zeros(len(manifests), np.int64), np.cumsum(onehot, axis=0)])
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self._cache: list[OrderedDict] = [OrderedDict() for _ in manifests]
        self._step = 0

    def _check_same_tokenizer(self) -> None:
        first = self._sources[0].manifest["tokenizer"]
        for src in self._sources[1:]:
            tok = src.manifest["tokenizer"]
            if (tok["vocab_size"], tok["eod_id"], tok.get("sha256")) != (first["vocab_size"], first["eod_id"],
                                                                         first.get("sha256")):
                raise ValueError(f"cannot blend {src.manifest_path} with {self._sources[0].manifest_path}: "
                                 f"different tokenizers ({tok['name']} vs {first['name']}); shard every "
                                 "source with the same tokenizer")

    # -- the schedule ---------------------------------------------------------------------

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within that source's stream) of global positions."""
        period, within = np.divmod(positions, BLEND_PERIOD)
        source = self._period_sources[within]
        return source, period * self._quota[source] + self._prefix[within, source]

    def samples_per_source(self, positions: int | None = None) -> np.ndarray:
        """How many of the first `positions` global samples (default: handed out) each source gave."""
        p = self._step * self.global_batch_size if positions is None else positions
        return (p // BLEND_PERIOD) * self._quota + self._prefix[p % BLEND_PERIOD]

    def realised_proportions(self) -> dict[str, float]:
        """Fraction of the global samples handed out so far per manifest (before any: the schedule's)."""
        counts = self.samples_per_source()
        total = counts.sum()
        fractions = counts / total if total else self._quota / BLEND_PERIOD
        return {path: float(f) for path, f in zip(self.manifest_paths, fractions)}

    # -- position ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "kind": "blend", "step": self._step,
                "samples_consumed_this_rank": self._step * self.micro_batch_size,
                "samples_per_source": self.samples_per_source().tolist(),
                "seed": self.seed, "shuffle": self.shuffle, "weights": self.weights,
                "micro_batch_size": self.micro_batch_size, "dp_world_size": self.dp_world_size,
                "dp_rank": self.dp_rank,
                "sources": [{"total_samples": int(s._counts.sum()), "num_shards": len(s._counts)}
                            for s in self._sources]}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. `dp_rank` may differ (the position is global)."""
        mine = self.state_dict()
        for key in ("kind", "seed", "shuffle", "weights", "micro_batch_size", "dp_world_size", "sources"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume blend loader: checkpoint has {key}={state.get(key)}, this "
                                 f"loader has {key}={mine[key]} ({self.manifest_paths}); resuming exactly "
                                 "needs the same data, weights, seed and batch layout")
        self._step = int(state["step"])

    # -- iteration --------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        g, b, r = self.global_batch_size, self.micro_batch_size, self.dp_rank
        while True:
            start = self._step * g + r * b
            sources, indices = self._locate(np.arange(start, start + b))
            keys, rows = [], []
            for s, j in zip(sources.tolist(), indices.tolist()):
                key, tokens = self._sample(s, j)
                keys.append(f"{s}:{key}")
                rows.append(tokens)
            # Counted before handing out, as in ShardLoader: a state taken after the step
            # that used this batch resumes at the next one.
            self._step += 1
            yield {"tokens": torch.from_numpy(np.stack(rows).astype(np.int64)), "keys": keys}

    def _sample(self, s: int, j: int) -> tuple[str, np.ndarray]:
        """Sample j of source s's infinite stream (its epochs back to back)."""
        src = self._sources[s]
        epoch, within = divmod(j, int(src._counts.sum()))
        cached_epoch, order = self._orders.get(s, (-1, None))
        if cached_epoch != epoch:
            order = src.epoch_order(epoch)
            self._orders[s] = (epoch, order)
        shard, row = (int(v) for v in order[within])
        cache = self._cache[s]
        if shard not in cache:
            cache[shard] = src.read_shard(shard)
            if len(cache) > _CACHED_SHARDS:
                cache.popitem(last=False)
        cache.move_to_end(shard)
        keys, tokens = cache[shard]
        return keys[row], tokens[row]


def _source_seed(seed: int, index: int) -> int:
    """A distinct, stable seed per source, so equal manifests are not shuffled alike."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


__all__ = ["BlendLoader", "blend_schedule", "BLEND_PERIOD"]
