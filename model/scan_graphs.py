"""The fast FAM scan's loops over static buffers, captured in CUDA graphs (issue 13).

Why: a layer's scan is T sequential steps of F rows each (model/scan_step.py). Compiled step by
step, each step still costs a Python call, dynamo's guards and ~15-30 kernel launches; measured
on one H200 (fam-1b, 8k tokens, model/fast_scan.py's first version): 324 compiled calls and
12.3k kernels per step, the GPU idle 37 % of the step while the CPU launched them. A CUDA graph
replays a whole loop (all T steps of a layer, forward or backward) as one launch.

How:
  - `StaticLoop` runs `run(buffers)` over buffers that never move. Its first call runs the loop
    directly (compiling the steps: capture must not compile) and then, on CUDA, captures it;
    later calls replay. Capturing right after the direct run keeps dynamo's guards (grad mode,
    strides) the same, so capture never recompiles. Off CUDA it re-runs the loop over the same
    buffers, so tests/test_scan.py checks the buffer plumbing (what is copied in and out) on CPU.
  - `static_scan(key, ...)` keeps one set of buffers per shape key (model/fast_scan.py: the spec,
    the number of blocks T and the tensor shapes, not the exact length: a partial last block is
    padded), shared by every layer: a layer copies its inputs in (FAM0, block K/V, RoPE tables),
    replays, and copies out what outlives the call, except the kept activations and (without layer
    recompute) the keys/values buffers: each call in flight has its own set of each, a slot
    (model/scan_slots.py), that its backward reads where the forward wrote it, with a loop pair per
    pair of slots. At most CACHE_SIZE keys are kept (least
    recently used goes first), so evaluation across many lengths does not pile up buffers.
    They outlive the model that made them until `clear()`: on one H200 (2026-12-01, fam-1b, bf16,
    a slot per layer) a training step left 1.3 GiB at 8k tokens, 2.3 at 16k, 4.3 at 32k and 8.4 at
    64k (layer recompute, scan stashed), which the next model then found in use.
  - The weights: where they are already in the GEMM dtype (bf16-mixed's bf16 parameters), each
    layer has its own pair of loops, chosen by its weights' addresses (`weights_key`), whose
    graphs read the parameters in place; the optimizer updates them in place, so a replay reads
    this step's values. Otherwise (fp32 weights under autocast) the weights are cast into the
    shape key's buffers, the cast the GEMMs need anyway, and one pair of loops serves every layer.
    Copying bf16 weights in took 36 weight-sized copies per fam-1b step at 8k tokens on an H200,
    3.9 ms of operator time ("Session 11"); read in place, the step's kernels took 189.2 against
    191.0 ms ("Session 12", benchmarks/results/2026-11-30-2xH200): a small gain, within the
    tokens/s noise between hosts, and one layer's weights less memory per shape key.
  - The captured loops share one memory pool: they replay one after another on one stream and
    each replay's outputs are copied out (or consumed) before the next replay, so a loop may
    reuse memory another used for its intermediates. The pool is taken from a graph still alive
    (`CUDAGraph.pool()`), never from a kept handle: a handle outlives its graphs, and capturing
    into a pool whose graphs are all gone (after `clear()` or eviction) fails an internal assert
    of the caching allocator (seen on an H200, torch 2.11).
A capture that fails warns and leaves that loop running uncaptured over the same buffers (the
compiled steps, never an O(S^2) path), on the stream it was called on.
"""

from __future__ import annotations

import collections
import warnings
from typing import Callable

import torch

from model.scan_slots import Slots

CACHE_SIZE = 4  # shape keys with buffers, slots and graphs (fam-1b: 1.3 GiB at 8k, 8.4 GiB at 64k, measured above)
# a forward and a backward loop per slot (model/scan_slots.py MAX_SLOTS) and per layer without one (fam-24b: 56
# layers): least recently used goes first, so too few would capture again and again
LOOPS_PER_SHAPE = 512
MODE = "cuda"  # "cuda": static buffers + graphs on CUDA; "always": static buffers on any device; "off"

_CACHE: collections.OrderedDict = collections.OrderedDict()


def uses_static_buffers(device: torch.device) -> bool:
    return MODE == "always" or (MODE == "cuda" and device.type == "cuda")


class StaticLoop:
    """A loop over fixed buffers: run directly once, then (CUDA) captured and replayed. `weights`:
    the layer's own weights, read in place (None: the buffers' copies). Like the graph, which
    reads the addresses it captured, an uncaptured loop (CPU, a failed capture) re-runs over the
    weights it was made with; once captured it drops them (the graph keeps no tensor alive)."""

    def __init__(self, run: Callable, buffers: dict, device: torch.device, weights: tuple | None = None):
        self.run, self.buffers, self.device, self.weights = run, buffers, device, weights
        self.graph, self.outputs, self.capturable = None, None, device.type == "cuda"

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        outputs = self.run(self._inputs())
        if self.capturable:
            self._capture()
        return outputs

    def _inputs(self) -> dict:
        return self.buffers if self.weights is None else dict(self.buffers, weights=self.weights)

    def _capture(self):
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.device)
        try:
            # thread_local: the backward captures on autograd's thread; another thread's
            # allocation (a data loader's pinned memory) must not invalidate the capture.
            with torch.cuda.graph(graph, pool=_live_pool(self.device), capture_error_mode="thread_local"):
                outputs = self.run(self._inputs())
        except RuntimeError as err:
            torch.cuda.set_stream(stream)  # a capture failing in torch.cuda.graph's __enter__ leaves its side stream
            self.capturable = False
            warnings.warn(f"the FAM scan's loop could not be captured in a CUDA graph and runs uncaptured: {err}")
            return
        self.graph, self.outputs, self.weights = graph, outputs, None


def _live_pool(device: torch.device):
    """The memory pool of a captured loop still alive on `device`, or None (a new pool)."""
    for scan in _CACHE.values():
        for loop in scan.loops.values():
            if loop.graph is not None and loop.device == device:
                return loop.graph.pool()
    return None


def weights_key(weights: tuple) -> tuple:
    """Where a layer's weights are: a captured graph reads exactly these addresses and strides
    (shapes and dtypes are in the shape key)."""
    return tuple((w.data_ptr(), tuple(w.stride())) for w in weights)


class StaticScan:
    """One shape key's buffers (forward's, backward's added on first use), its slots
    (model/scan_slots.py: kept activations in `slots`, the block keys/values in `blocks`) and its
    loops: one forward and one backward for all layers (weights copied in), or one pair per layer
    (weights read in place), each per pair of slots, at most LOOPS_PER_SHAPE (least recently used
    goes first)."""

    def __init__(self, device: torch.device):
        self.device, self.buffers, self.slots, self.blocks = device, {}, Slots(), Slots()
        self.loops: collections.OrderedDict = collections.OrderedDict()
        self.constants: int | None = None  # the sequence length the constant inputs are for (model/fast_scan.py)

    def buffers_for(self, slot: int | None, blocks: int | None = None) -> dict:
        """The buffers a loop runs over: the shared ones, with `slot`'s kept activations and `blocks`'
        keys/values buffers (None: the shared ones, which are copied in or cloned out)."""
        b = self.buffers if slot is None else dict(self.buffers, saved=self.slots[slot].buffers)
        if blocks is not None:
            b = dict(b, **self.blocks[blocks].buffers._asdict())  # keys, values
        return b

    def loop(self, name: str, run: Callable, weights: tuple | None = None, slot: int | None = None,
             blocks: int | None = None) -> StaticLoop:
        """The loop `name` ("forward", "backward") for these weights read in place (None: copied in)
        over `slot`'s kept activations and `blocks`' keys/values (None: the shared buffers')."""
        key = (name, None if weights is None else weights_key(weights), slot, blocks)
        if key in self.loops:
            self.loops.move_to_end(key)
            return self.loops[key]
        self.loops[key] = StaticLoop(run, self.buffers_for(slot, blocks), self.device, weights)
        while len(self.loops) > LOOPS_PER_SHAPE:
            self.loops.popitem(last=False)
        return self.loops[key]


def static_scan(key, device: torch.device) -> StaticScan:
    """The StaticScan of `key`, made (empty) if new; the least recently used beyond CACHE_SIZE go."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    _CACHE[key] = StaticScan(device)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return _CACHE[key]


def clear() -> None:
    """Drop every cached buffer and graph (tests; or to give the memory back)."""
    _CACHE.clear()
