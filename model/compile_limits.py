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

import torch

SHAPE_LIMIT = 64  # graphs per compiled function and process


class CompileLimitError(RuntimeError):
    pass


@contextlib.contextmanager
def bounded_compiles(what: str):
    """Run compiled calls of `what` with dynamo's cache sized to SHAPE_LIMIT, failing past it."""
    import torch._dynamo

    limits = dict(
        recompile_limit=SHAPE_LIMIT,
        accumulated_recompile_limit=max(4 * SHAPE_LIMIT, torch._dynamo.config.accumulated_recompile_limit),
        fail_on_recompile_limit_hit=True,
    )
    try:
        with torch._dynamo.config.patch(**limits):
            yield
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise CompileLimitError(
            f"{what} has been compiled for {SHAPE_LIMIT} different input shapes in this process; an "
            "eager fallback would materialise O(S^2) memory, so this stops instead. Use fewer distinct "
            "shapes (pad sequences to a few lengths, multiples of model.block_size) or raise "
            "model.compile_limits.SHAPE_LIMIT."
        ) from err
