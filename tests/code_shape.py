"""The repository's own modules read with ast (nothing imported): their import graph and the shape
of their files and functions, for tests/test_code_shape.py.

Import graph: an edge A -> B for every `import B` / `from B import x` in module A that names one of
the project's modules, wherever it stands (top level or inside a function: a deferred import only
hides a cycle until the function runs). `from P import name` is an edge to P.name when that is a
module, else to P. A package's own __init__ is not an implicit edge of its submodules (Python runs
it first, whatever the submodule imports), so re-exports in an __init__ are no cycle by themselves.

Shape: a file has at most MAX_FILE_LINES lines; a function at most MAX_FUNCTION_LINES lines and
MAX_PARAMETERS parameters (self/cls not counted), unless a comment `# shape: <reason>` stands on
its def line or the line just above (above its decorators, if any).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "pipeline", "data_prep", "slurm", "benchmarks")  # tests/ are not checked: see the test file
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
REASON = "# shape:"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = REPO, packages=PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every .py under the packages."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports (see the module docstring)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, module, path.name == "__init__.py")
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        found.update(name for name in names if name in modules and name != module)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


@dataclass
class Problem:
    where: str  # file:line
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def has_reason(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    near = [lines[node.lineno - 1]] + ([lines[first - 2]] if first >= 2 else [])
    return any(REASON in line for line in near)


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def shape_problems(path: Path, root: Path = REPO) -> list[Problem]:
    """Files, functions and parameter lists over the limits, without a stated reason."""
    source = path.read_text()
    lines = source.splitlines()
    where = str(path.relative_to(root))
    problems = []
    if len(lines) > MAX_FILE_LINES:
        problems.append(Problem(where, f"{len(lines)} lines (at most {MAX_FILE_LINES}): split it by concern"))
    for node in ast.walk(ast.parse(source, where)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or has_reason(lines, node):
            continue
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
            problems.append(Problem(f"{where}:{node.lineno}", f"{node.name} has {length} lines "
                                    f"(at most {MAX_FUNCTION_LINES}, or say why: `{REASON} ...`)"))
        count = parameter_count(node)
        if count > MAX_PARAMETERS:
            problems.append(Problem(f"{where}:{node.lineno}", f"{node.name} has {count} parameters "
                                    f"(at most {MAX_PARAMETERS}, or say why: `{REASON} ...`)"))
    return problems
