"""The FAM scan kept out of layer recompute (ModelArgs.recompute_fam_scan = False).

With recompute, each layer's forward runs twice: once in the forward pass, keeping only the layer's
input, and again in backward (torch.utils.checkpoint). The second run repeats the FAM scan, T
sequential steps of F rows whose cost is the time to read the layer's weights T times, not their
FLOPs: on an H200 (2026-11-30, fam-1b, 64k tokens) that repeat was 99 ms of a 1,870 ms step. What
the scan's backward reads is small beside what recompute saves: F rows per block
(model/scan_step.py `Activations`; fam-1b: 6.3 MB per block and layer, 0.4 GB per layer at 64k
tokens, against the block tokens' ~25x that).

So `contexts` is checkpoint's `context_fn`: the first run appends what each model/fast_scan.py
`FAMScan` call returns and keeps for its backward to a `Stash`, and the recompute of the same
checkpointed call takes them back in the same order instead of running the scan again. The rest
of the layer (the block tokens' QKV, which the scan's backward also reads) is recomputed as before.
One Stash per checkpointed call: nothing is shared between layers, micro-batches or pipeline
stages, whatever order their backwards run in.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("famtron_scan_stash", default=(None, False))


class Stash:
    """What each FAMScan call of one checkpointed layer call kept, in call order."""

    def __init__(self):
        self.entries: collections.deque = collections.deque()


def contexts():
    """torch.utils.checkpoint's context_fn: (the forward's context, the recompute's context)."""
    stash = Stash()
    return _using(stash, replaying=False), _using(stash, replaying=True)


@contextlib.contextmanager
def _using(stash: Stash, replaying: bool):
    token = _CURRENT.set((stash, replaying))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> tuple[Stash | None, bool]:
    """(the Stash of the checkpointed call running now or None, whether this is its recompute)."""
    return _CURRENT.get()
