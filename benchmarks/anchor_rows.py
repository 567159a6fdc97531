"""The plain-model anchor beside `benchmarks.train_step`'s rows, and the rows' JSON record.

    anchor = load_anchor("../shared/gpu/anchor_gpt.py")         # imported into this process
    row = run_anchor(anchor, args, seq=8192, recompute=False)  # same shape and attention as `args`
    path = write_records(records, "benchmarks/results")       # <date>-<card>/train_step.json, merged

The anchor (/work/shared/gpu/anchor_gpt.py, outside the repository, so its path is an argument)
is a plain PyTorch Llama-style decoder in pure bf16: RMSNorm, RoPE, SwiGLU, causal SDPA or BSWA
through FlexAttention, fused AdamW over bf16 weights. It is what a lean bf16 step should reach
(issue 13). Each famtron row is compared with the anchor of its shape (layers, width, heads,
query groups, SwiGLU size, vocabulary: `anchor_shape`) and attention: dense-* against causal SDPA,
bswa-* and fam-* against BSWA with famtron's block size C and memory blocks m (the anchor has no
FAM; the ratio of a fam row is what FAM costs over the plain BSWA model). The anchor runs in this
process, after famtron's cell, with its activation checkpointing on where the cell recomputed.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
from pathlib import Path

import torch

from benchmarks.profiling import profile_kernels
from data_prep.manifest import write_json_atomic
from model.config import ModelArgs
from pipeline.training.flops import peak_flops

DEFAULT_ANCHOR = "../shared/gpu/anchor_gpt.py"
ANCHOR_SIZE = "famtron"  # the key under which the row's shape is put into the anchor's SIZES


def load_anchor(path: str | os.PathLike):
    """The anchor script imported as a module (its `run`, `SIZES`, `ATTN`), or SystemExit naming the path."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--anchor {path}: no such file; give the path of the shared anchor_gpt.py "
                         f"(default {DEFAULT_ANCHOR}, relative to the folder you run from)")
    spec = importlib.util.spec_from_file_location("anchor_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchor_shape(args: ModelArgs) -> tuple[int, int, int, int, int, int]:
    """The anchor's SIZES entry for famtron's model args: (layers, d_model, heads, kv_heads, ffn, vocab)."""
    return (args.num_layers, args.hidden_size, args.num_attention_heads, args.query_groups, args.ffn_size,
            args.vocab_size)


def anchor_attention(args: ModelArgs) -> dict:
    """The anchor's ATTN settings for famtron's attention: dense -> causal SDPA, else BSWA with C and m."""
    if args.attention == "dense":
        return {"mode": "sdpa"}
    return {"mode": "bswa", "C": args.block_size, "m": args.mem_blocks}


def run_anchor(anchor, args: ModelArgs, seq: int, recompute: bool, steps: int, profile: bool = False) -> dict:
    """One anchor row at famtron's shape, attention and sequence: tokens/s, MFU (its own FLOP count
    over this card's peak, pipeline/training/flops.py), peak memory; {"oom": True} if it does not fit.
    With `profile`, also its kernels per step, GPU-busy fraction and every kernel by name
    (benchmarks/profiling.py), to diff against famtron's row."""
    anchor.SIZES[ANCHOR_SIZE] = anchor_shape(args)
    anchor.ATTN.update(anchor_attention(args))
    anchor._masks.clear()  # its block masks are cached per sequence length only: C and m may differ per row
    try:
        r = anchor.run(ANCHOR_SIZE, seq, recompute, False, steps=steps)
        profiled = _profile_anchor(anchor, seq, recompute, r["step_s"]) if profile else {}
    except torch.OutOfMemoryError:
        return {"attention": anchor.ATTN["mode"], "oom": True, "recompute": recompute}
    finally:
        torch._dynamo.reset()  # its compiled FlexAttention and ours must not share one recompile budget
        torch.cuda.empty_cache()
    peak = peak_flops(torch.device("cuda"))
    return {"attention": r["attn"], "tokens_per_s": r["tok_s"], "tflops": r["tflops"],
            "mfu": r["tflops"] * 1e12 / peak if peak else None, "peak_gib": r["peak_gib"], "recompute": recompute,
            **profiled}


def _profile_anchor(anchor, seq: int, recompute: bool, step_seconds: float) -> dict:
    """One profiled step of the anchor's model, built and stepped as its `run` does (bf16 weights,
    fused AdamW, loss from the model), after two warm-up steps."""
    layers, d, heads, kv_heads, ffn, vocab = anchor.SIZES[ANCHOR_SIZE]
    model = anchor.GPT(layers, d, heads, kv_heads, ffn, vocab, recompute).cuda().bfloat16()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens, targets = (torch.randint(0, vocab, (1, seq), device="cuda") for _ in range(2))

    def step():
        model(tokens, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    return profile_kernels(step, wall_seconds=step_seconds)


def card_name() -> str:
    """`<n>x<model>` of this machine, e.g. 1xH200 (the results folders' naming)."""
    if not torch.cuda.is_available():
        return "cpu"
    model = torch.cuda.get_device_name().split()[-1].replace("/", "-")
    return f"{torch.cuda.device_count()}x{model}"


def to_record(name: str, seq: int, precision: str, result: dict, anchor_row: dict | None) -> dict:
    """One row as a JSON record: config, seq_len, precision, tokens_per_s, mfu, peak_gib, recompute,
    the rest of the cell's figures, and the anchor's row with the ratio of tokens/s to it."""
    record = {"config": name, "seq_len": seq, "precision": precision, **{k: v for k, v in result.items()}}
    for key in ("tokens_per_s", "mfu", "peak_gib"):
        record.setdefault(key, None)  # an out-of-memory row keeps the fields, empty
    if anchor_row is not None:
        record["anchor"] = anchor_row
        ours, theirs = record["tokens_per_s"], anchor_row.get("tokens_per_s")
        record["x_anchor"] = ours / theirs if ours and theirs else None
    return record


def write_records(records: list[dict], results_dir: str | os.PathLike, day: str | None = None,
                  card: str | None = None) -> Path:
    """`records` into `<results_dir>/<date>-<card>/train_step.json`, written whole (temp file, rename).
    Records already there are kept unless this run has one of the same config, seq_len, precision,
    scan_compile_mode (absent: "default"), loss_path (absent: whole logits, before 2026-12),
    fused_ops (absent: eager RoPE and SwiGLU), scan_weights (absent: read in place), scan_slots (absent:
    on), scan_attention (absent: the matrix products, as before 2026-12), scan_blocks (absent: "reloaded",
    as before 2026-12-02), scan_first_step (absent: "separate"), micro_batch (absent: 1) and recompute, so
    a benchmark split over several commands (one per sequence length) fills one file."""
    folder = Path(results_dir) / f"{day or datetime.date.today().isoformat()}-{card or card_name()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_step.json"
    key = lambda r: (r.get("config"), r.get("seq_len"), r.get("precision"),  # noqa: E731
                     r.get("scan_compile_mode", "default"), r.get("loss_path"), r.get("fused_ops"),
                     r.get("scan_weights"), r.get("scan_slots"), r.get("scan_attention"),
                     r.get("scan_blocks", "reloaded"), r.get("scan_first_step", "separate"), r.get("micro_batch", 1),
                     r.get("recompute"))
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path} is not valid JSON ({err}): move it away or give another --results-dir") from None
    new = {key(r) for r in records}
    write_json_atomic(str(path), [r for r in earlier if key(r) not in new] + records, sort_keys=False)
    return path
