"""benchmarks/trace_diff.py on made-up traces: device time summed by kernel name in each, listed by the
first's extra time; the kernels only the first runs grouped by their launch count; a bad file named."""

from __future__ import annotations

import gzip
import json

import pytest

from benchmarks import trace_diff


def _x(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {}}


FIRST = [_x("kernel", "gemm", 0, 100), _x("kernel", "gemm", 200, 100), _x("kernel", "flash_bwd", 300, 40),
         _x("kernel", "flash_bwd", 400, 40), _x("kernel", "join", 500, 50), _x("gpu_memcpy", "Memcpy DtoD", 600, 5),
         _x("cpu_op", "aten::mm", 0, 1000)]  # a CPU operator: not device time
SECOND = [_x("kernel", "gemm", 0, 90), _x("kernel", "gemm", 200, 90), _x("gpu_memcpy", "Memcpy DtoD", 600, 15)]


def test_extra_time_by_kernel_and_the_first_ones_own_kernels_by_launch_count():
    first, second = trace_diff.kernel_time(FIRST), trace_diff.kernel_time(SECOND)
    assert first == {"gemm": [2, 200.0], "flash_bwd": [2, 80.0], "join": [1, 50.0], "Memcpy DtoD": [1, 5.0]}
    rows = trace_diff.diff(first, second)
    assert [(r[0], round(r[1], 3)) for r in rows] == [("flash_bwd", 0.08), ("join", 0.05), ("gemm", 0.02),
                                                       ("Memcpy DtoD", -0.01)]
    assert rows[0][2:] == (2, 0.08, 0, 0.0)
    assert trace_diff.only_first_by_launches(first, second) == [(2, 1, 0.08), (1, 1, 0.05)]


def test_the_command_prints_both_tables_and_names_a_bad_file(tmp_path, capsys):
    paths = []
    for name, events in (("fam", FIRST), ("bswa", SECOND)):
        paths.append(tmp_path / f"{name}.trace.json.gz")
        paths[-1].write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    trace_diff.main([str(p) for p in paths] + ["--top", "2"])
    out = capsys.readouterr().out
    assert "first: 0.3 ms in 6 device events; second: 0.2 ms in 3; +0.1 ms" in out
    assert "| +0.08 | 2 | 0.08 | 0 | 0.00 | flash_bwd |" in out and "| gemm |" not in out  # --top 2
    assert "| 2 | 1 | 0.08 |" in out
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(SystemExit, match="bad.json: not a readable Chrome trace"):
        trace_diff.main([str(tmp_path / "bad.json"), str(paths[1])])
