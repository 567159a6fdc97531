"""benchmarks/trace_gaps.py on a made-up Chrome trace (times in us): each device gap in one class, by the
launch of the kernel after it, and the CPU operator the GPU waited on; a trace that train_step's --trace
writes on the CPU reads too; a bad file is an error that names it."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from benchmarks import trace_gaps


def _x(cat, name, ts, dur, tid=1, correlation=None):
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


EVENTS = [
    _x("cpu_op", "aten::linear", 0, 1000, tid=1),
    _x("cpu_op", "FAMScanBackward", 500, 400, tid=2),
    _x("cpu_op", "aten::add", 600, 50, tid=2),  # ended before the late launch: not the one around it
    _x("cuda_runtime", "cudaLaunchKernel", 10, 2, correlation=1),
    _x("cuda_runtime", "cudaGraphLaunch", 20, 5, correlation=2),
    _x("cuda_driver", "cuLaunchKernel", 700, 3, tid=2, correlation=3),  # Triton's launch, late
    _x("kernel", "gemm", 100, 50, correlation=1),
    _x("gpu_memcpy", "Memcpy DtoD", 120, 10, correlation=4),  # inside the gemm: no gap
    _x("kernel", "step_a", 152, 10, correlation=2),  # 2 us after the gemm, launched long before
    _x("kernel", "step_b", 170, 10, correlation=2),  # 8 us after step_a, the same graph launch
    _x("kernel", "add_rows", 720, 10, correlation=3),  # 540 us: its launch came at 700
    {"ph": "i", "name": "an instant, not a complete event", "ts": 5},
]


def test_each_gap_lands_in_its_class_with_the_operator_the_gpu_waited_on():
    gaps = trace_gaps.find_gaps(EVENTS)
    assert [(g.us, g.before, g.after, g.cause, g.host_op) for g in gaps] == [
        (2, "gemm", "step_a", "launched in time", ""),
        (8, "step_a", "step_b", "inside a CUDA graph", ""),
        (540, "step_b", "add_rows", "waited for the CPU", "FAMScanBackward")]
    found = trace_gaps.summary(gaps, top=2)
    assert found["ms"] == 0.55 and found["gaps"] == 3
    assert found["by_class"] == {"waited for the CPU": [0.54, 1], "inside a CUDA graph": [0.008, 1],
                                 "launched in time": [0.002, 1]}
    assert found["waited_on"] == [["FAMScanBackward", 0.54, 1]]
    assert [g.us for g in found["largest"]] == [540, 8]
    assert [g.us for g in trace_gaps.find_gaps(EVENTS, min_us=5)] == [8, 540]


def test_a_gzipped_trace_from_the_profiler_reads_and_prints(tmp_path, capsys):
    from benchmarks.profiling import profile_kernels

    a = torch.randn(64, 64)
    path = tmp_path / "cpu.trace.json.gz"
    profile_kernels(lambda: a @ a, device="cpu", trace_path=path)
    assert any(e.get("name") == "aten::mm" for e in trace_gaps.load_events(path))
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": EVENTS}).encode()))
    trace_gaps.main([str(path), "--top", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "device idle 0.55 ms in 3 gaps"
    assert "  0.54 ms in 1 gaps: FAMScanBackward" in out
    assert out[-1] == "  540.0 us, waited for the CPU (CPU in FAMScanBackward): step_b -> add_rows"


@pytest.mark.parametrize("content, words", [
    (b"not json", "not a readable Chrome trace"),
    (gzip.compress(json.dumps({"traceEvents": EVENTS}).encode())[:40], "not a readable Chrome trace"),  # cut short
    (b"\x1f\x8bgarbage", "not a readable Chrome trace"),
    (b'{"events": []}', "no traceEvents list")], ids=["not json", "cut gzip", "corrupt gzip", "no events"])
def test_a_file_that_is_no_trace_names_itself(tmp_path, content, words):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=words) as err:
        trace_gaps.load_events(path)
    assert str(path) in str(err.value)
