"""`python -m benchmarks.train_step` on CPU, where it can run: the GPU command given in README.md
parses (a typo fails here, not on the GPU machine), the anchor it imports has each row's exact
shape, and the rows' JSON record and path. The timing itself needs a GPU (the benchmark exits
saying so here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import train_step
from benchmarks.anchor_rows import DEFAULT_ANCHOR, anchor_attention, anchor_shape, load_anchor, to_record, write_records
from model import load_model_args
from tests.time_bounds import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parent.parent
# The GPU command of README.md's "Measured" section, as argv.
GPU_COMMAND = ["--configs", "fam-1b", "bswa-1b", "dense-1b", "--seq-lens", "8192", "32768", "65536", "131072",
               "--precision", "bf16-mixed", "--profile", "--anchor", DEFAULT_ANCHOR]


def _main(argv: list[str], monkeypatch) -> str:
    monkeypatch.chdir(ROOT)  # the anchor's default path is relative to the repository root
    monkeypatch.setattr(sys, "argv", ["train_step", *argv])
    with pytest.raises(SystemExit) as stop:
        train_step.main()
    return str(stop.value.code)


def test_the_gpu_command_parses_and_stops_only_for_want_of_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU machine too: parse, never run
    assert _main(GPU_COMMAND, monkeypatch) == "benchmarks.train_step measures GPU speed: no CUDA device here"
    for name in ("fam-1b", "bswa-1b", "dense-1b"):
        load_model_args(name)  # every config named in the command exists
    stop = _main([*GPU_COMMAND[:-1], "no/such/anchor.py"], monkeypatch)
    assert stop.startswith("--anchor no/such/anchor.py: no such file")
    assert _main(["--seqlens", "8192"], monkeypatch) == "2"  # argparse's usage error for a misspelt option
    assert "unrecognized arguments: --seqlens" in capsys.readouterr().err
    # one micro-batch per length, or one for all: three for two lengths is a usage error naming both
    assert _main(["--seq-lens", "8192", "32768", "--micro-batch", "4", "2", "2"], monkeypatch) == "2"
    assert "--micro-batch 4 2 2: give one value, or one per --seq-lens entry (2)" in capsys.readouterr().err
    # recompute likewise (one per length: fam / bswa alike at each), and one value with micro-chunks
    assert _main(["--seq-lens", "8192", "32768", "--recompute", "off", "on", "on"], monkeypatch) == "2"
    assert "--recompute off on on: give one value, or one per --seq-lens entry (2)" in capsys.readouterr().err
    assert _main(["--seq-lens", "8192", "32768", "--recompute", "kept"], monkeypatch) == "2"
    assert "invalid choice: 'kept'" in capsys.readouterr().err
    assert _main(["--seq-lens", "8192", "32768", "--recompute", "off", "on", "--micro-chunk-len", "4096"],
                 monkeypatch) == "2"
    assert "give one value with --micro-chunk-len" in capsys.readouterr().err
    assert _main(["--seq-lens", "8192", "32768", "--micro-batch", "4", "2", "--anchor", DEFAULT_ANCHOR],
                 monkeypatch) == "2"
    assert "1 with --anchor" in capsys.readouterr().err


def test_each_length_gets_its_own_micro_batch_or_all_the_one_given():
    from argparse import Namespace

    from benchmarks import train_step

    assert train_step.micro_batches(Namespace(seq_lens=[8192, 32768, 65536], micro_batch=[4, 2, 2])) == [4, 2, 2]
    assert train_step.micro_batches(Namespace(seq_lens=[8192, 32768], micro_batch=[2])) == [2, 2]
    assert train_step.per_length(["off", "on", "on"], [8192, 32768, 65536]) == ["off", "on", "on"]
    assert train_step.per_length(["auto"], [8192, 32768]) == ["auto", "auto"]


@pytest.mark.parametrize("name", ["fam-1b", "bswa-1b", "dense-1b"])
def test_anchor_row_has_the_famtron_rows_shape_and_attention(name):
    """The anchor built at `anchor_shape` has famtron's parameter count, less only the FAM prompt
    (F x d, which the anchor has no counterpart for); built on the meta device, no memory."""
    anchor = load_anchor(ROOT / DEFAULT_ANCHOR)
    args = load_model_args(name, vocab_size=32000)
    with torch.device("meta"):
        model = anchor.GPT(*anchor_shape(args))
    prompt = args.fam_len * args.hidden_size if args.uses_fam else 0
    assert sum(p.numel() for p in model.parameters()) == args.num_params(embeddings=True) - prompt
    expected = {"mode": "sdpa"} if name == "dense-1b" else {"mode": "bswa", "C": 1024, "m": 3}
    assert anchor_attention(args) == expected


def test_rows_are_saved_as_records_with_the_anchor_beside_them(tmp_path):
    cell = {"tokens_per_s": 30000.0, "mfu": 0.3, "peak_gib": 40.0, "recompute": False, "loss": 10.4}
    anchor = {"attention": "bswa", "tokens_per_s": 40000.0, "mfu": 0.4, "peak_gib": 30.0, "recompute": False}
    records = [to_record("fam-1b", 8192, "bf16-mixed", cell, anchor),
               to_record("dense-1b", 131072, "bf16-mixed", {"oom": True, "recompute": True}, None)]
    path = write_records(records, tmp_path / "results", day="2026-11-29", card="1xH200")
    assert path == tmp_path / "results" / "2026-11-29-1xH200" / "train_step.json"
    saved = json.loads(path.read_text())
    for record in saved:
        assert {"config", "seq_len", "tokens_per_s", "mfu", "peak_gib", "recompute", "precision"} <= set(record)
    assert saved[0]["x_anchor"] == pytest.approx(0.75) and saved[0]["anchor"] == anchor
    assert saved[1]["tokens_per_s"] is None and saved[1]["oom"] and "anchor" not in saved[1]
    assert [p.name for p in path.parent.iterdir()] == ["train_step.json"]  # no temp file left
    # A second command (another sequence length, or the same row again) adds to the file or replaces its row.
    again = {**records[0], "tokens_per_s": 31000.0}
    later = to_record("fam-1b", 32768, "bf16-mixed", cell, anchor)
    write_records([again, later], tmp_path / "results", day="2026-11-29", card="1xH200")
    saved = json.loads(path.read_text())
    assert [(r["config"], r["seq_len"], r["tokens_per_s"]) for r in saved] == [
        ("dense-1b", 131072, None), ("fam-1b", 8192, 31000.0), ("fam-1b", 32768, 30000.0)]
    # The same cell with the scan compiled in another mode (--scan-compile-mode) is a row of its own.
    autotuned = {**records[0], "tokens_per_s": 33000.0, "scan_compile_mode": "max-autotune-no-cudagraphs"}
    write_records([autotuned], tmp_path / "results", day="2026-11-29", card="1xH200")
    saved = json.loads(path.read_text())
    assert [(r["seq_len"], r["tokens_per_s"]) for r in saved if r["config"] == "fam-1b"] == [
        (8192, 31000.0), (32768, 30000.0), (8192, 33000.0)]
    # So is the same cell on the other loss path (--loss; records without the key: whole logits).
    chunked = {**records[0], "tokens_per_s": 29000.0, "loss_path": "chunked"}
    write_records([chunked], tmp_path / "results", day="2026-11-29", card="1xH200")
    saved = json.loads(path.read_text())
    assert [(r["seq_len"], r["tokens_per_s"]) for r in saved if r["config"] == "fam-1b"] == [
        (8192, 31000.0), (32768, 30000.0), (8192, 33000.0), (8192, 29000.0)]
    # And the scan's keys/values held for its backward (--scan-blocks; records without the key reloaded them).
    held = {**records[0], "tokens_per_s": 34000.0, "scan_blocks": "held"}
    reloaded = {**records[0], "tokens_per_s": 32000.0, "scan_blocks": "reloaded"}  # replaces the keyless 31000
    for record in (held, reloaded):  # two commands: the second keeps the first's row
        write_records([record], tmp_path / "results", day="2026-11-29", card="1xH200")
    saved = json.loads(path.read_text())
    assert [(r["seq_len"], r["tokens_per_s"]) for r in saved if r["config"] == "fam-1b"] == [
        (32768, 30000.0), (8192, 33000.0), (8192, 29000.0), (8192, 34000.0), (8192, 32000.0)]
    # And the same cell with layer recompute (--recompute on, where auto's memory rule left it off).
    write_records([{**held, "tokens_per_s": 27000.0, "recompute": True}], tmp_path / "results", day="2026-11-29",
                  card="1xH200")
    saved = json.loads(path.read_text())
    assert [(r["tokens_per_s"], r["recompute"]) for r in saved if r.get("scan_blocks") == "held"] == [
        (34000.0, False), (27000.0, True)]


def test_the_benchmark_step_takes_the_trainers_loss_path_unless_asked_for_whole_logits(monkeypatch):
    """train_step's default is the trainer's chunked lm_loss (no logits kept: the memory estimator's
    path); --loss whole asks for the logits. Both give the same loss."""
    from benchmarks.train_step import step_loss
    from model import build_model
    from tests.test_reference import small_args

    model = build_model(small_args(), device="cpu")
    tokens = torch.randint(0, 64, (1, 97))  # small_args: vocabulary 64; 96 tokens, a partial last block
    seen = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: seen.append(k["return_logits"]) or
                        forward(self, *a, **k))
    chunked, whole = step_loss(model, tokens), step_loss(model, tokens, "whole")
    assert seen == [False, True]
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)


def test_profile_counts_launches_per_step_and_ranks_names_by_time():
    """benchmarks/profiling.py on the CPU's operators (the same counting as the GPU's kernels):
    launches and time per step, every name with its launches, longest first; two steps profiled
    at once give the same per-step figures; the operators that spent the time come with their
    input shapes. Nothing here depends on which op ran longest: on a loaded host that varies."""
    from benchmarks.profiling import profile_kernels

    a = torch.randn(384, 384)

    def step():  # the relu first: a list left in the order the ops ran is then out of order
        a.relu()
        for _ in range(3):
            a @ a

    one = profile_kernels(step, steps=1, device="cpu")
    two = profile_kernels(lambda: (step(), step()), steps=2, device="cpu")
    for found in (one, two):
        assert found["kernels_per_step"] == 4
        names = {name: launches for name, launches, _ in found["kernels"]}
        assert names == {"aten::matmul": 3, "aten::relu": 1}
        # longest first, by the figures measured: which op that is depends on the host's load (a busy CI core
        # once held a relu longer than three products), the order of the list does not
        times = [ms for _, _, ms in found["kernels"]]
        assert times == sorted(times, reverse=True)
        assert 0 < found["kernel_ms"] <= sum(times) + 1e-9
        ops = {name: (shapes, calls) for name, shapes, calls, _ in found["ops"]}  # with their input shapes
        assert ops["aten::mm"] == ("[[384, 384], [384, 384]]", 3)
        op_times = [ms for *_, ms in found["ops"]]
        assert op_times == sorted(op_times, reverse=True)
        assert found["host_ms"] > 0 and found["syncs"] == []  # the CPU's time to issue a step; no CUDA here
        gaps = found["gaps"]  # the idle time between the ops: their span less the time some op ran
        assert gaps["count"] >= 1 and 0 <= gaps["ms"] and abs(sum(gaps["by_size"].values()) - gaps["ms"]) < 1e-9
        assert gaps["copy_ms"] == 0  # no copies or memsets on the CPU's timeline
        assert set(found["allocator"].values()) == {0}  # the CUDA caching allocator's calls: none here


def test_the_profiled_step_is_saved_as_a_chrome_trace_when_asked(tmp_path):
    """benchmarks/profiling.py save_trace through profile_kernels: a gzipped Chrome trace whose events are
    the profiled run's operators, in a folder made for it, and no temp file left."""
    import gzip
    import json

    from benchmarks.profiling import profile_kernels

    a = torch.randn(64, 64)
    path = tmp_path / "traces" / "fam-1b-8192-mb4.trace.json.gz"
    profile_kernels(lambda: a @ a, device="cpu", trace_path=path)
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_trace_needs_profile_and_names_each_cell(monkeypatch, capsys):
    from benchmarks import train_step

    monkeypatch.setattr("sys.argv", ["train_step", "--configs", "fam-1b", "--seq-lens", "8192", "--trace", "t"])
    with pytest.raises(SystemExit):
        train_step.parse_options()
    assert "--trace t: traces are taken of the profiled step; add --profile" in capsys.readouterr().err
    assert train_step.trace_name("fam-1b", 65536, 2, True) == "fam-1b-65536-mb2-recompute.trace.json.gz"


def test_idle_gaps_sum_each_gap_once_by_size_and_by_the_kernels_around_it():
    """benchmarks/profiling.py idle_gaps on a made-up timeline (ns): overlapping kernels leave no gap, a gap
    runs from the latest end so far, and each lands in one size bin and one (before, after) pair."""
    from benchmarks.profiling import idle_gaps

    kernels = [(0, 10_000, "gemm"), (11_000, 20_000, "copy"), (25_000, 40_000, "gemm"),
               (30_000, 35_000, "flash"),  # inside the gemm: no gap, and the gemm stays the one before the next
               (240_000, 241_000, "copy"), (241_500, 250_000, "gemm")]
    gaps = idle_gaps(kernels, steps=2)  # per step: everything halved
    assert gaps["count"] == 2.0
    assert gaps["ms"] == (1_000 + 5_000 + 200_000 + 500) / 1e6 / 2
    assert gaps["by_size"] == {"<=2us": 0.00075, "<=10us": 0.0025, "<=100us": 0.0, "more": 0.1}
    # the 1 us and 200 us gaps follow a gemm (the 200 us one the gemm that ended last, not the flash inside it)
    assert gaps["pairs"] == [["gemm", "copy", 1.0, 0.1005], ["copy", "gemm", 1.0, 0.00275]]
    from benchmarks.profiling import ALLOCATOR_COUNTS, allocator_calls

    before, after = dict.fromkeys(ALLOCATOR_COUNTS, 7), dict(zip(ALLOCATOR_COUNTS, (9, 11, 7, 8)))
    assert allocator_calls(before, after, steps=2) == {"alloc_retries": 1.0, "device_alloc": 2.0, "device_free": 0.0,
                                                       "sync_all_streams": 0.5}


def test_the_table_shows_each_rows_profile_and_an_out_of_memory_row(monkeypatch, capsys):
    """The console table of a --profile run: GPU busy, kernel and idle ms per step, the kernel-time
    ratio to bswa, kernels, the CPU's ms per step and the waits for the GPU per row
    (benchmarks/profiling.py), blank cells for a row that ran out of memory."""
    from argparse import Namespace

    from benchmarks import train_step

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    row = dict(tokens_per_s=30e3, tflops=250.0, mfu=0.25, peak_gib=40.0, recompute=False, gpu_busy=0.8,
               kernel_ms=200.0, kernels_per_step=10180, host_ms=212.4, syncs=[["model/x.py:3", 2], ["model/y.py:9", 1]])
    rows = [("bswa-1b", 8192, dict(row, tokens_per_s=40e3, kernel_ms=170.0)), ("fam-1b", 8192, row),
            ("dense-1b", 8192, {"oom": True, "recompute": True, "micro_batch": 4})]
    train_step.print_table(rows, Namespace(precision="bf16-mixed", vocab_size=32000, profile=True))
    lines = capsys.readouterr().out.splitlines()
    # 200 ms of kernels at 80 % busy: 50 ms idle; bswa's 170 ms of kernels against fam's 200: 0.850
    assert lines[-2] == ("| fam-1b | 8,192 | 1 | 30.0k | 0.75 | 250 | 25% | 40.0 GiB | False | 80% | 200.0 | 50.0 "
                         "| 0.850 | 10,180 | 212 | 3 |")
    assert lines[-1].startswith("| dense-1b | 8,192 | 4 | out of memory |")
    assert lines[-1].count("|") == lines[-2].count("|") == lines[2].count("|")
    # a row with its gaps between kernels counted (benchmarks/profiling.py idle_gaps) shows those as idle:
    # the wall time less the kernel time is not idle time where kernels overlap (here 200 ms at 101 % busy)
    gaps = {"ms": 9.2, "count": 1762.0, "by_size": {"<=2us": 1.3, "<=10us": 2.3, "<=100us": 1.4, "more": 4.2},
            "pairs": [], "copy_ms": 2.8}
    counted = dict(row, gpu_busy=1.01, gaps=gaps)
    train_step.print_table([("fam-1b", 8192, counted)], Namespace(precision="bf16-mixed", vocab_size=32000,
                                                                   profile=True))
    assert "| 101% | 200.0 | 9.2 |" in capsys.readouterr().out


def test_a_profiled_row_prints_where_its_gpu_idled(capsys):
    from benchmarks import train_step

    gaps = {"ms": 19.3, "count": 9163.0, "by_size": {"<=2us": 8.0, "<=10us": 6.0, "<=100us": 4.3, "more": 1.0},
            "pairs": [["a", "b", 162.0, 2.5], ["b", "c", 18.0, 1.25], ["c", "a", 1.0, 0.5], ["x", "y", 1.0, 0.1]],
            "copy_ms": 0.75}
    allocator = {"alloc_retries": 0.5, "device_alloc": 2.0, "device_free": 1.0, "sync_all_streams": 0.5}
    train_step.print_gaps("fam-1b", 8192, gaps, allocator)
    train_step.print_gaps("bswa-1b", 8192, None)  # not profiled: nothing
    assert capsys.readouterr().out.splitlines() == [
        "fam-1b 8,192: idle 19.3 ms a step in 9,163 gaps (ms by gap: <=2us 8.0, <=10us 6.0, <=100us 4.3, more 1.0);"
        " copies and memsets 0.8 ms; allocator a step: 0.5 alloc_retries, 2 device_alloc, 1 device_free,"
        " 0.5 sync_all_streams",
        "  2.50 ms in 162 gaps: a -> b", "  1.25 ms in 18 gaps: b -> c", "  0.50 ms in 1 gaps: c -> a"]


def test_a_wait_inside_torch_is_placed_at_the_project_line_that_led_to_it():
    """benchmarks/profiling.py sync_site: a wait in torch's own code (an H200 run found one
    `torch.cuda.synchronize` per step) names the innermost frame outside torch and the warnings
    machinery; a wait in the project's code is named as it is."""
    import traceback
    import warnings

    from benchmarks.profiling import sync_site

    synchronize = str(Path(torch.__file__).parent / "cuda" / "__init__.py")
    stack = [traceback.FrameSummary("/work/main/benchmarks/profiling.py", 90, "host_side"),
             traceback.FrameSummary("/work/main/model/layer.py", 77, "forward"),
             traceback.FrameSummary(str(Path(torch.__file__).parent / "utils" / "checkpoint.py"), 12, "x"),
             traceback.FrameSummary(synchronize, 1270, "synchronize"),
             traceback.FrameSummary(warnings.__file__, 40, "_showwarnmsg")]
    assert sync_site(synchronize, 1270, stack) == f"{synchronize}:1270 <- /work/main/model/layer.py:77"
    assert sync_site("/work/main/model/fast_scan.py", 159, stack) == "/work/main/model/fast_scan.py:159"


def test_the_json_rows_carry_the_anchor_row_beside_each_row():
    """`--json` rows (what a GPU run brings back) hold the anchor as the results folder's records do."""
    record = to_record("bswa-1b", 8192, "bf16-mixed", {"tokens_per_s": 50.0},
                       {"tokens_per_s": 40.0, "kernels": [["k", 1, 1.0]], "ops": []})
    assert train_step._anchor_part(record) == {"anchor": {"tokens_per_s": 40.0}, "x_anchor": 1.25}
    assert train_step._anchor_part(to_record("fam-1b", 8192, "bf16-mixed", {"tokens_per_s": 1.0}, None)) == {}


def test_every_train_step_command_of_fam_speed_sh_parses(monkeypatch, tmp_path):
    """benchmarks/fam_speed.sh (issue 13's GPU phases): each train_step line, its shell variables
    filled in, parses and stops only for want of a GPU; an unknown phase exits 2 naming it."""
    import re
    import subprocess

    script = (ROOT / "benchmarks" / "fam_speed.sh").read_text()
    fill = {'"${CONFIGS[@]}"': "fam-1b bswa-1b dense-1b", '"$ANCHOR"': DEFAULT_ANCHOR,
            '"$OUT/$name.json"': "runs/x/short.json", '"$OUT"': "runs/x", "${PROFILE:+--profile}": "--profile",
            '"${SEQ:-8192}"': "8192", '"$b"': "4", '"${MB:-4}"': "4", '"$s"': "off", '"$k"': "reloaded", '"$f"': "merged",
            '${COMPILE_CACHE:+--compile-cache "$COMPILE_CACHE"}': "--compile-cache runs/x/compile-cache",
            '${TRACE:+--trace "$OUT/traces"}': "", "${SCAN_FLAGS:-}": "--scan-attention cudnn"}
    script = script.replace("\\\n", " ")  # continued lines joined
    table, pair = re.findall(r"python3 -m benchmarks\.train_step (.*?)>", script)
    # the phases that run pair() (a comment may follow the phase's name): their own flags
    pair_flags = re.findall(r"\)(?:\s*#[^\n]*\n)?\s*pair [\w-]+ (.*?) ;;", script)
    pair_flags += re.findall(r'pair "batch-[^"]*" (.*?); done', script)  # `batches`: one pair per micro-batch
    pair_flags += re.findall(r'pair "slots-[^"]*" (.*?); done', script)  # `slots`: on and off
    pair_flags += re.findall(r'pair "blocks-[^"]*" (.*?); done', script)  # `blocks`: held and reloaded
    pair_flags += re.findall(r'pair "firststep-[^"]*" (.*?); done', script)  # `firststep`: merged and separate
    pair_flags += re.findall(r"\n\s+pair codegen (.*?)\n", script)  # `codegen`: with inductor's output code logged
    assert len(pair_flags) == 10
    commands = [table.replace('"$@"', "8192")] + [pair.replace('"$@"', flags) for flags in pair_flags]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in commands:
        for var, value in fill.items():
            command = command.replace(var, value)
        assert "$" not in command, command
        assert _main(command.split(), monkeypatch) == "benchmarks.train_step measures GPU speed: no CUDA device here"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "fam_speed.sh"), str(tmp_path / "out"), "nonesuch"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert done.returncode == 2 and "unknown phase 'nonesuch'" in done.stdout, done


def test_scan_slots_off_turns_the_slots_off_and_on_brings_the_default_back(monkeypatch):
    import argparse

    from benchmarks import micro_chunk_step
    from model import compile_limits, fast_scan, mlp, rope, scan_slots, scan_step

    for module, name in ((scan_slots, "MAX_SLOTS"), (fast_scan, "COMPILE_MODE"), (fast_scan, "WEIGHTS_IN_PLACE"),
                         (fast_scan, "HOLD_BLOCKS"), (fast_scan, "MERGED_FIRST_STEP"),
                         (scan_step, "FLASH"), (scan_step, "FUSED_KERNEL"), (rope, "FUSED"), (mlp, "FUSED"),
                         (compile_limits, "STATIC_SHAPES"),
                         (micro_chunk_step, "RECOMPUTE_FAM_SCAN"), (micro_chunk_step, "OVERLAP_FAM_SCAN")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    parser = argparse.ArgumentParser()
    train_step.add_kernel_arguments(parser)
    train_step.apply_kernel_options(parser.parse_args(["--scan-slots", "off"]))
    assert scan_slots.MAX_SLOTS == 0
    train_step.apply_kernel_options(parser.parse_args([]))
    assert scan_slots.MAX_SLOTS == scan_slots.DEFAULT_MAX_SLOTS > 0
    assert fast_scan.COMPILE_MODE == fast_scan.COMBO_KERNELS and fast_scan.HOLD_BLOCKS  # the defaults
    train_step.apply_kernel_options(parser.parse_args(["--scan-compile-mode", "default", "--scan-blocks", "reloaded"]))
    assert fast_scan.COMPILE_MODE is None and not fast_scan.HOLD_BLOCKS and not fast_scan.MERGED_FIRST_STEP
    train_step.apply_kernel_options(parser.parse_args(["--scan-first-step", "merged"]))
    assert fast_scan.MERGED_FIRST_STEP
    assert scan_step.FLASH and scan_step.FUSED_KERNEL == "flash"
    train_step.apply_kernel_options(parser.parse_args(["--scan-attention", "cudnn"]))
    assert scan_step.FLASH and scan_step.FUSED_KERNEL == "cudnn"
    train_step.apply_kernel_options(parser.parse_args(["--scan-attention", "matmul"]))
    assert not scan_step.FLASH
