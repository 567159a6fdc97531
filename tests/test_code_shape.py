"""The code's shape, read with ast over model/, pipeline/, data_prep/, slurm/ and benchmarks/
(tests/code_shape.py): no import cycle anywhere in the project, no file over 400 lines, no function
over 60 lines or with more than 8 parameters unless a `# shape: <reason>` comment says why.

tests/ are left out: test files gather many cases around one fixture and are no part of the
import graph that a run loads. The compiled FAM scan step takes every weight and table as a
separate tensor argument (torch.compile and CUDA graphs want flat tensor inputs), so its functions
are the listed exception to the parameter limit.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests import code_shape

# The compiled scan step's entry points: flat tensor arguments by design (model/scan.py docstring).
COMPILED_SCAN_STEP = {("model/scan.py", "fam_step"), ("model/scan_step.py", "step_forward"),
                      ("model/scan_step.py", "step_backward"), ("model/fast_scan.py", "forward"),
                      ("model/scan_first_step.py", "step_forward_first"),
                      ("model/scan_first_step.py", "step_backward_first")}


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_the_project_import_graph_has_no_cycle():
    modules = code_shape.project_modules()
    assert {"model", "pipeline.train", "pipeline.training.loop", "data_prep.shard", "slurm.submit"} <= set(modules)
    graph = code_shape.import_graph(modules)
    assert "pipeline.training.loop" in graph["pipeline.train"]  # the graph sees real imports
    cycle = code_shape.find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_through_a_deferred_relative_import_is_found(tmp_path):
    write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "from pkg import b\n\ndef f():\n    return b\n",
        "pkg/b.py": "def g():\n    from .c import h\n    return h\n",
        "pkg/c.py": "import pkg.a\n\ndef h():\n    return pkg.a\n",
    })
    graph = code_shape.import_graph(code_shape.project_modules(tmp_path, ["pkg"]))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
    assert code_shape.find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    write(tmp_path, {"pkg/c.py": "def h():\n    return 1\n"})  # the cycle broken: nothing found
    assert code_shape.find_cycle(code_shape.import_graph(code_shape.project_modules(tmp_path, ["pkg"]))) is None


def test_files_and_functions_stay_within_their_limits():
    problems = []
    for path in code_shape.project_modules().values():
        rel = str(path.relative_to(code_shape.REPO))
        problems += [p for p in code_shape.shape_problems(path)
                     if not (p.what.split()[0] and (rel, p.what.split()[0]) in COMPILED_SCAN_STEP)]
    assert not problems, "\n".join(map(str, problems))


def test_long_functions_wide_signatures_and_long_files_are_reported_unless_a_reason_is_given(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    write(tmp_path, {"pkg/m.py": (
        f"def long():\n{body}\n\n"
        "def wide(self, a, b, c, d, e, f, g, h, i):\n    pass\n\n"
        f"# shape: a table written out\ndef excused():\n{body}\n\n"
        "def narrow(self, a, b, c, d, e, f, g, h):  # eight besides self\n    pass\n"
    )})
    found = [p.what.split(" has ")[0] for p in code_shape.shape_problems(tmp_path / "pkg/m.py", tmp_path)]
    assert found == ["long", "wide"]
    write(tmp_path, {"pkg/big.py": "x = 1\n" * 401})
    assert "401 lines" in str(code_shape.shape_problems(tmp_path / "pkg/big.py", tmp_path)[0])


def test_every_citation_of_the_fam_notes_names_a_section_of_docs_fam_md():
    """Code cites docs/fam.md by section ('docs/fam.md, "Initial FAM"') and the paper by arXiv id;
    the research notes outside the repository are cited nowhere."""
    import re

    sections = set(re.findall(r"^#+ (.+)$", (code_shape.REPO / "docs" / "fam.md").read_text(), re.M))
    files = [*code_shape.project_modules().values(), *(code_shape.REPO / "tests").glob("*.py"),
             *(code_shape.REPO / "configs").rglob("*.yaml")]
    cited, outside = set(), []
    for path in files:
        text = path.read_text()
        cited |= {name for name in re.findall(r'docs/fam\.md,? "([^"]+)"', text)}
        outside += [str(path)] if "fam-paper" + ".md" in text else []
    assert cited and cited <= sections, cited - sections
    assert not outside, outside
