"""No model code assigns a Python number into a tensor by index: the CPU-side guard of issue 13's
"a training step never waits for the GPU" (tests/test_gpu_syncs.py checks the step itself on GPU).

On CUDA, `t[i] = 0.0` makes a 0-dim tensor in pageable host memory and copies it over, which waits
for the GPU to finish its queue. On an H200 (2026-11-30) `scales[0] = 0.0` in model/fast_scan.py
made every fam-1b step wait for the GPU 36 times at 8k tokens, 54 at 64k. `t[i].fill_(0.0)` passes
the value as a kernel argument. The CPU cannot see such a wait, so this reads model/'s code.
"""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "model"


def number_item_assignments(source: str) -> list[int]:
    """Lines of `x[...] = <number>` (a constant, its negation, or float(...) / int(...))."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Subscript) for t in node.targets):
            value = node.value.operand if isinstance(node.value, ast.UnaryOp) else node.value
            constant = isinstance(value, ast.Constant) and type(value.value) in (int, float)
            cast = isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("float", "int")
            if constant or cast:
                lines.append(node.lineno)
    return lines


def test_the_finder_sees_the_assignments_that_waited_on_an_h200():
    source = 'scales[0] = 0.0\nbias[-1, a:] = float("-inf")\nx[1] = -1\nscales[:1].fill_(0.0)\nd["k"] = y\n'
    assert number_item_assignments(source) == [1, 2, 3]


def test_no_model_code_assigns_a_python_number_into_a_tensor_by_index():
    found = {f"{path.name}:{line}" for path in sorted(MODEL.rglob("*.py"))
             for line in number_item_assignments(path.read_text())}
    assert not found, f"use .fill_(value) instead (a host copy that waits for the GPU on CUDA): {sorted(found)}"
