"""Where the captured FAM scan keeps each call's activations for its backward: slots (issue 13).

Why: the scan's loops replay over static buffers shared by every layer (model/scan_graphs.py), so
each call's kept activations (model/scan_step.py `Activations`, F rows per block) were cloned out
of them after the forward and copied back in before the backward. On one H200 (fam-1b, 8k tokens,
micro-batch 4, "Session 16") that round trip was 252 copies and 4.0 ms of a step's kernels. A slot
is one call's own set of those buffers: the forward loop writes them and the backward loop reads
them where they are, so neither copy runs. The same class keeps a second kind of slot, a call's
keys/values buffers [T, F + C, b, g, d] (model/fast_scan.py `_take_blocks`), taken only where no
layer recompute follows, so that the backward need not load the block and FAM K/V again.

How:
  - A slot is busy while anything besides the slot references its memory: the aliases the forward
    hands out (saved by FAMScan's ctx, held by a recompute's stash, or a checkpoint's detached
    copy of them) keep it busy until autograd frees them after the backward; if the backward never
    runs, until the graph is dropped; under retain_graph, until the last backward is done. That is
    the storage's use count, so a slot is never written while anything can still read it, whatever
    order the micro-batches' backwards run in (1F1B keeps several forwards of a layer in flight).
  - A captured graph reads fixed addresses, so each slot has its own loops (model/scan_graphs.py
    keys them by slot). Slots belong to a layer (its weights' addresses; one owner for all where the
    weights are copied in), and a layer's k-th call in flight takes its k-th slot: the same calls
    take the same slots, and replay the same graphs, step after step. (Slots shared by all layers,
    each taking the first free one, would pair layers and slots anew each step when more than one
    call of a layer is in flight, and capture a new graph for each new pair.)
  - A layer with no free slot of its own takes another layer's free one (which is then its own too)
    before a new one: where the calls run one after another (model.recompute_fam_scan re-runs each
    layer's scan just before its backward), every layer shares one slot, as the clones did, instead
    of keeping one each between steps (fam-1b at 64k: 0.4 GB a layer).
  - At most MAX_SLOTS_PER_OWNER per layer (where the weights are read in place) and MAX_SLOTS per
    shape key (0: none, the copies as before). Past them (more calls in flight: micro-chunks kept
    for one backward) a call's activations go through the shared buffers and are cloned out.
  - The slots stay allocated between steps, as the static buffers do: what they hold at the peak is
    what the clones held. `scan_graphs.clear()` gives them back.
"""

from __future__ import annotations

from typing import Callable

import torch

DEFAULT_MAX_SLOTS = 128  # per shape key: layers x calls in flight (fam-1b: 18 layers; 1F1B: x the stages ahead)
MAX_SLOTS = DEFAULT_MAX_SLOTS  # benchmarks.train_step --scan-slots off sets 0
MAX_SLOTS_PER_OWNER = 8  # a layer's calls in flight: 1F1B's first stage keeps up to the pipeline's depth


# How many tensors (and storage objects) share a storage's memory: what torch's own CUDA-graph trees
# ask to know whether a graph's output is still alive. Without it (another build), no slots.
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _uses(t: torch.Tensor) -> int:
    return _USE_COUNT(t.untyped_storage()._cdata)


class Slot:
    def __init__(self, buffers: tuple):
        self.buffers = buffers
        self.idle = tuple(_uses(t) for t in buffers)

    def free(self) -> bool:
        return all(_uses(t) == n for t, n in zip(self.buffers, self.idle))

    def holds(self, kept: tuple) -> bool:
        return len(kept) == len(self.buffers) and all(
            x.data_ptr() == t.data_ptr() and x.shape == t.shape and x.stride() == t.stride()
            for x, t in zip(kept, self.buffers))

    def lend(self) -> tuple:
        """Aliases of the buffers, which keep the slot busy while they (or aliases of them) live."""
        return type(self.buffers)(*(t.detach() for t in self.buffers))


class Slots:
    """One shape key's slots, and which of them each owner (a layer's weights, or None) has."""

    def __init__(self):
        self.slots: list[Slot] = []
        self.owned: dict = {}

    def take(self, owner, make: Callable[[], tuple]) -> int | None:
        """The owner's first free slot; else another owner's free slot, which becomes the owner's
        too; else a new one made by `make`; None past the limits."""
        if _USE_COUNT is None:
            return None
        mine = self.owned.setdefault(owner, [])
        index = next((i for i in mine if self.slots[i].free()), None)
        cap = MAX_SLOTS if owner is None else MAX_SLOTS_PER_OWNER  # None: every layer's calls
        if index is not None or len(mine) >= cap:
            return index
        index = next((i for i, slot in enumerate(self.slots) if i not in mine and slot.free()), None)
        if index is None and len(self.slots) < MAX_SLOTS:
            self.slots.append(Slot(make()))
            index = len(self.slots) - 1
        if index is not None:
            mine.append(index)
        return index

    def find(self, kept: tuple) -> int | None:
        """The slot whose buffers `kept` are (a backward's saved activations), or None (clones)."""
        return next((i for i, slot in enumerate(self.slots) if slot.holds(kept)), None)

    def __getitem__(self, index: int) -> Slot:
        return self.slots[index]
