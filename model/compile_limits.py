"""Compiled kernels that fail loudly instead of falling back to eager (issue 13, item 5).

torch.compile keeps one graph per input shape (static shapes) and, past dynamo's recompile
limit (8 per function by default), silently runs the function eagerly from then on. For
FlexAttention and its block-mask builder, eager means materialising the whole S x S score or
mask grid: seen on an H200, an evaluation at 64k tokens tried to allocate 64 GiB after a test
session had compiled flex_attention for 8 other shapes. A process that meets many shapes (a test
session, evaluation across lengths) must get either a compiled kernel or an error.

So every compiled call of the model runs inside `bounded_compiles`: dynamo may keep up to
SHAPE_LIMIT graphs per function (each holds only generated code, no device memory: 64 covers
training at several lengths plus every GPU test in one process), and past that it raises
FailOnRecompileLimitHit, turned here into an error that says what to do. Functions are also
compiled with fullgraph=True where they have no collectives, which fails on the limit too.
"""

from __future__ import annotations

import contextlib
import functools

import torch

SHAPE_LIMIT = 64  # graphs per compiled function and process

# The SHAPE_LIMIT dynamo's config was last set to. The limits are set for the whole process on the
# first compiled call (and again if SHAPE_LIMIT changes, as tests do), not patched in and out around
# each call: `torch._dynamo.config.patch` costs ~110 us a call on a 2-core CPU, ~90 calls per fam-1b
# step, and at 8k tokens and micro-batch 1 the GPU waits on the CPU's launches (issue 13). So every
# torch.compile'd function in a famtron process fails past SHAPE_LIMIT instead of running eagerly.
# Tests change the limit with `shape_limit`, which sets it back on the way out.
_applied: int | None = None


# The pointwise ops (model/rope.py's QKV split + RoPE, model/mlp.py's SwiGLU) are compiled for their
# first STATIC_SHAPES input shapes one by one (static shapes: a training run meets one, its sequence
# length), and for every later shape one graph compiled for dynamic shapes serves them all
# (evaluation across many lengths, generation), so no count of shapes reaches SHAPE_LIMIT. 0: the
# dynamic graph only. Why static first: on an H200 (2026-11-30, benchmarks/results/2026-11-30-2xH200,
# "Session 10") the kernels compiled for dynamic shapes ran 3-9x slower than those compiled for the
# shape they met (the SwiGLU backward 22.7 against 7.7 ms, the RoPE backward 9.3 against 1.0 ms per
# bswa-1b step at 8k), and bswa-1b ran 43.6k against 51.8k tokens/s; a static kernel's sizes are
# constants in its index arithmetic. torch's own automatic dynamic shapes would not do: after a
# second shape (an evaluation at another length) it compiles a dynamic graph that may then serve
# the training length too; here the training length keeps its static graph (tests/test_fused_ops.py).
# `benchmarks.train_step --fused-op-shapes dynamic` measures the dynamic kernels.
STATIC_SHAPES = 8


class Pointwise:
    """`fn` compiled whole (fullgraph: no silent eager fallback), static for its first STATIC_SHAPES
    input shapes and dtypes, dynamic past them. The two torch.compile wrappers keep separate graphs
    (dynamo matches a cached graph to the wrapper that compiled it), so the training shape keeps its
    static graph whatever shapes come after."""

    def __init__(self, fn):
        self.static = torch.compile(fn, dynamic=False, fullgraph=True)
        self.dynamic = torch.compile(fn, dynamic=True, fullgraph=True)
        self.static_shapes: set = set()

    def __call__(self, *args):
        key = tuple((a.shape, a.dtype) for a in args if isinstance(a, torch.Tensor))
        if STATIC_SHAPES and (key in self.static_shapes or len(self.static_shapes) < STATIC_SHAPES):
            self.static_shapes.add(key)
            return self.static(*args)
        return self.dynamic(*args)


@functools.lru_cache(maxsize=8)
def compiled_pointwise(fn) -> Pointwise:
    """The one Pointwise of `fn` in this process."""
    return Pointwise(fn)


class CompileLimitError(RuntimeError):
    pass


def _apply_limits() -> None:
    global _applied
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = SHAPE_LIMIT
    config.accumulated_recompile_limit = max(4 * SHAPE_LIMIT, config.accumulated_recompile_limit)
    config.fail_on_recompile_limit_hit = True
    _applied = SHAPE_LIMIT


@contextlib.contextmanager
def bounded_compiles(what: str):
    """Run compiled calls of `what` with dynamo's cache sized to SHAPE_LIMIT, failing past it."""
    if _applied != SHAPE_LIMIT:
        _apply_limits()
    try:
        yield
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise CompileLimitError(
            f"{what} has been compiled for {SHAPE_LIMIT} different input shapes in this process; an "
            "eager fallback would materialise O(S^2) memory, so this stops instead. Use fewer distinct "
            "shapes (pad sequences to a few lengths, multiples of model.block_size) or raise "
            "model.compile_limits.SHAPE_LIMIT."
        ) from err


@contextlib.contextmanager
def shape_limit(limit: int):
    """SHAPE_LIMIT = `limit` inside (tests), the previous limit applied again on the way out."""
    global SHAPE_LIMIT
    previous, SHAPE_LIMIT = SHAPE_LIMIT, limit
    try:
        yield
    finally:
        SHAPE_LIMIT = previous
        _apply_limits()
