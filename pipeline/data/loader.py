"""Training and validation batches from the token shards of `python -m data_prep.shard`.

    loader = ShardLoader("data/x/train/manifest.json", micro_batch_size=4, seq_len=512,
                         dp_rank=dp_rank, dp_world_size=dp_world_size, seed=1234)
    for batch in loader:      # infinite; batch["tokens"]: LongTensor [b, seq_len + 1]
        ...                   # batch["keys"]: the b sample keys
    ckpt["data"] = loader.state_dict();  loader.load_state_dict(ckpt["data"])

Sample order (why it is built by hand): webdataset has no state_dict, so exact resume
needs an order that can be recomputed from (seed, epoch) and entered at any step.
Per epoch:
  1. the shards are permuted with rng(seed, epoch);
  2. the permuted list is cut into windows of WINDOW_SHARDS shards; the samples of a
     window are permuted with rng(seed, epoch, window) (a window rather than a single
     shard, so one batch mixes several shards, i.e. several parts of the corpus);
  3. the windows' samples, concatenated, are the epoch's *global order*.
The global order depends on neither the micro batch nor the data-parallel size.
Global step k of an epoch is the positions [k*G, (k+1)*G) with G = dp_world_size *
micro_batch_size; rank r takes the slice [k*G + r*b, k*G + (r+1)*b). So ranks never
share a sample, and the union of the ranks' batches at step k is exactly the batch a
single process with micro batch G gets at step k. Every rank has floor(N / G) steps per
epoch (the tail is dropped), so collectives never wait on a rank that ran out.
shuffle=False uses the manifest's shard and sample order (validation).

Resume: the position (epoch, step) is global, the same on every rank, and counts the
batches handed out by the iterator; a new loader with the same seed, micro batch and
DP size continues at the next sample, skipping whole windows without reading them.
Iterate in the main process (no DataLoader workers): a worker's prefetching would make
"batches handed out" differ from "batches consumed".

Cost: each rank reads every shard of a window that holds one of its samples, i.e.
roughly all data (I/O x dp_world_size). That is the price of the DP-size-independent
order and fine at our scale (shards are small and sit in the page cache).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from data_prep.manifest import load_manifest, shard_path, verify_shards

WINDOW_SHARDS = 8
_STATE_VERSION = 1


def manifest_info(path: str) -> dict:
    """A short summary of a manifest (for logs and for checking vocab_size against the model)."""
    m = load_manifest(path)
    return {"path": path, "split": m.get("split"), "seq_len": m["seq_len"], "dtype": m["dtype"],
            "vocab_size": m["tokenizer"]["vocab_size"], "eod_id": m["tokenizer"]["eod_id"],
            "tokenizer": m["tokenizer"]["spec"], "num_shards": len(m["shards"]),
            "total_samples": m["total_samples"], "total_tokens": m.get("total_tokens")}


class ShardLoader:
    """Infinite, resumable, data-parallel batches from one split's manifest (order above)."""

    def __init__(self, manifest_path: str, micro_batch_size: int, seq_len: int, dp_rank: int = 0,
                 dp_world_size: int = 1, seed: int = 1234, shuffle: bool = True,
                 verify_checksums: bool = True):
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_world_size - 1}")
        self.manifest_path = manifest_path
        self.manifest = load_manifest(manifest_path)
        if self.manifest["seq_len"] != seq_len:
            raise ValueError(f"manifest {manifest_path} was sharded with seq_len="
                             f"{self.manifest['seq_len']} but seq_len={seq_len} was requested: "
                             f"re-shard with --seq-len {seq_len} or change the training seq_len")
        verify_shards(manifest_path, self.manifest, checksums=verify_checksums)
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.seed, self.shuffle = seed, shuffle
        self._counts = np.array([s["samples"] for s in self.manifest["shards"]], dtype=np.int64)
        self.global_batch_size = dp_world_size * micro_batch_size
        self.steps_per_epoch = int(self._counts.sum()) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"manifest {manifest_path} has {int(self._counts.sum())} samples, fewer "
                             f"than one global batch (dp_world_size {dp_world_size} x micro_batch_size "
                             f"{micro_batch_size} = {self.global_batch_size})")
        self._epoch, self._step = 0, 0

    # -- position ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "epoch": self._epoch, "step": self._step,
                "samples_consumed_this_rank": (self._epoch * self.steps_per_epoch + self._step)
                * self.micro_batch_size,
                "seed": self.seed, "shuffle": self.shuffle,
                "micro_batch_size": self.micro_batch_size, "dp_world_size": self.dp_world_size,
                "dp_rank": self.dp_rank, "total_samples": int(self._counts.sum()),
                "num_shards": len(self._counts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. `dp_rank` may differ (the position is global)."""
        for key in ("seed", "shuffle", "micro_batch_size", "dp_world_size", "total_samples", "num_shards"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"cannot resume data loader: checkpoint has {key}={state.get(key)}, "
                                 f"this loader has {key}={mine} ({self.manifest_path}); resuming "
                                 "exactly needs the same data, seed and batch layout")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    # -- iteration --------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self._step >= self.steps_per_epoch:
                self._epoch, self._step = self._epoch + 1, 0
            epoch = self._epoch
            for step, batch in self._epoch_batches(epoch, self._step):
                # Count the batch as consumed before handing it out: a state_dict taken after
                # the training step that used it must resume at the next one.
                self._step = step + 1
                yield batch

    def _epoch_batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, dict]]:
        """(step, batch) for this rank's steps start_step.. of `epoch`, in order."""
        g, b, r = self.global_batch_size, self.micro_batch_size, self.dp_rank
        step, rows, keys = start_step, [], []
        window_start = 0
        for w, shards in enumerate(self._windows(epoch)):
            size = int(self._counts[shards].sum())
            positions = np.arange(window_start, window_start + size)
            window_start += size
            in_step, offset = positions // g, positions % g
            mine = ((in_step >= start_step) & (in_step < self.steps_per_epoch)
                    & (offset >= r * b) & (offset < (r + 1) * b))
            if not mine.any():
                continue  # resume skips whole windows without reading them
            wanted = self._window_order(epoch, w, shards)[mine]  # [n, 2]: (shard, row)
            samples = self._read(wanted)
            for shard, row in wanted:
                key, tokens = samples[(shard, row)]
                keys.append(key)
                rows.append(tokens)
                if len(rows) == b:
                    yield step, {"tokens": torch.from_numpy(np.stack(rows).astype(np.int64)),
                                 "keys": keys}
                    step, rows, keys = step + 1, [], []

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's global order as (shard, row) pairs [N, 2] (used by `pipeline.data.blend`)."""
        return np.concatenate([self._window_order(epoch, w, shards)
                               for w, shards in enumerate(self._windows(epoch))])

    def read_shard(self, shard: int) -> tuple[list[str], np.ndarray]:
        """Every sample of one shard: (keys, tokens [n, seq_len + 1]), checked against the manifest."""
        keys, rows = [], []
        for sample in self._shard_samples(shard):
            keys.append(sample["__key__"])
            rows.append(self._check(sample, shard))
        if len(rows) != self._counts[shard]:
            raise ValueError(f"shard {self._shard_path(shard)} has {len(rows)} samples, "
                             f"{self.manifest_path} says {self._counts[shard]}: re-run python -m data_prep.shard")
        return keys, np.stack(rows)

    def _windows(self, epoch: int) -> list[np.ndarray]:
        order = np.arange(len(self._counts))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(order)
        return [order[i:i + WINDOW_SHARDS] for i in range(0, len(order), WINDOW_SHARDS)]

    def _window_order(self, epoch: int, window: int, shards: np.ndarray) -> np.ndarray:
        pairs = np.concatenate([np.stack([np.full(self._counts[s], s), np.arange(self._counts[s])], 1)
                                for s in shards])
        if self.shuffle:
            pairs = pairs[np.random.default_rng([self.seed, epoch, 1, window]).permutation(len(pairs))]
        return pairs

    def _read(self, wanted: np.ndarray) -> dict[tuple[int, int], tuple[str, np.ndarray]]:
        """Read the wanted (shard, row) samples, one shard at a time, with webdataset."""
        rows_by_shard: dict[int, set[int]] = {}
        for shard, row in wanted:
            rows_by_shard.setdefault(int(shard), set()).add(int(row))
        out = {}
        for shard, rows in rows_by_shard.items():
            for row, sample in enumerate(self._shard_samples(shard)):
                if row in rows:
                    out[(shard, row)] = (sample["__key__"], self._check(sample, shard))
        missing = [tuple(map(int, p)) for p in wanted if tuple(map(int, p)) not in out]
        if missing:
            raise ValueError(f"shard {self._shard_path(missing[0][0])} has fewer samples than "
                             f"{self.manifest_path} says: re-run python -m data_prep.shard")
        return out

    def _shard_samples(self, shard: int) -> Iterator[dict]:
        # An explicit pipeline with no node/worker splitter: the order above already
        # decides which rank gets which sample.
        pipeline = wds.DataPipeline(wds.SimpleShardList([self._shard_path(shard)]),
                                    wds.tarfile_to_samples(), wds.decode())
        return iter(pipeline)

    def _check(self, sample: dict, shard: int) -> np.ndarray:
        tokens = sample.get("tokens.npy")
        if tokens is None or tokens.shape != (self.seq_len + 1,):
            shape = None if tokens is None else tokens.shape
            raise ValueError(f"sample {sample['__key__']} in {self._shard_path(shard)} has tokens of "
                             f"shape {shape}, expected ({self.seq_len + 1},)")
        return tokens

    def _shard_path(self, shard: int) -> str:
        return shard_path(self.manifest_path, self.manifest["shards"][shard])


class ValidLoader:
    """One finite pass over a split in manifest order; re-iterable, same batches each time."""

    def __init__(self, loader: ShardLoader):
        self._loader = loader

    def __len__(self) -> int:
        return self._loader.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        for _, batch in self._loader._epoch_batches(epoch=0, start_step=0):
            yield batch


def build_valid_loader(manifest_path: str, micro_batch_size: int, seq_len: int, dp_rank: int = 0,
                       dp_world_size: int = 1, verify_checksums: bool = True) -> ValidLoader:
    """Validation batches: finite, deterministic, DP-split like training, tail dropped."""
    return ValidLoader(ShardLoader(manifest_path, micro_batch_size, seq_len, dp_rank=dp_rank,
                                   dp_world_size=dp_world_size, shuffle=False,
                                   verify_checksums=verify_checksums))


__all__ = ["ShardLoader", "ValidLoader", "build_valid_loader", "manifest_info", "WINDOW_SHARDS"]
