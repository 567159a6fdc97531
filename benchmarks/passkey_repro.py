"""`python -m benchmarks.passkey_repro`: the PassKey reproduction, FAM against its BSWA twin (issue 15 item 5).

    python -m benchmarks.passkey_repro [--out runs/passkey-repro/report] [--root .] [-- --section.key=value ...]
    python -m benchmarks.passkey_repro --report --out DIR     # redraw the pictures from DIR/summary.json
    python -m benchmarks.passkey_repro --tiny ...              # a seconds-sized run of every stage (CPU tests)

One command, four stages:
  1. data: byte-level shards of the Python standard library at the training length (5 % held
     out, for validation and loss by position) and synthetic PassKey samples of exactly one
     training sample each (python -m data_prep.passkey); both skip what is already there;
  2. training: configs/recipes/passkey-fam.yaml and passkey-bswa.yaml (same size, data, steps and
     seeds; F = 16 against F = 0), each `python -m pipeline.train` in its own process, on GPUs 0
     and 1 at once when two are visible, one after the other otherwise. Each run ends with its
     in-loop evaluation (eval section: PassKey at 1x-256x the training length over depths 0-100 %,
     loss by position over 64x the training length), also where train.max_wall_seconds stops it;
     a rerun resumes a stopped run from its checkpoint;
  3. report: `--out` gets summary.json (every number), summary.md (PassKey table FAM vs BSWA),
     each model's passkey.json / position_loss.json and pictures, and both loss-by-position
     curves in one picture;
  4. exit status 1 if a training failed (its log is in --out).
Without MLflow (the GPU image has none) tracking is turned off; without matplotlib the pictures
are skipped and `--report` draws them later from summary.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = ("fam", "bswa")
DATA = "data/passkey-repro"
SEQ_LEN, PASSKEY_SAMPLES, VALID_FRACTION = 1024, 32768, 0.05

# --tiny: the same stages at a size that runs in seconds on a CPU (tests/test_passkey_repro.py).
TINY_SEQ_LEN = 256  # the smallest power of two above a PassKey document's fixed part (252 bytes)
TINY = {
    "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 2, "model.block_size": 16,
    "model.fam_len@fam": 4, "data.seq_len": TINY_SEQ_LEN, "data.micro_batch_size": 2, "data.global_batch_size": 2,
    "optim.warmup_steps": 1, "train.steps": 3, "train.eval_interval_steps": 3, "train.eval_steps": 1,
    "train.max_wall_seconds": None, "train.log_interval_steps": 1, "checkpoint.save_interval_steps": 3,
    "eval.passkey_lengths": [TINY_SEQ_LEN, TINY_SEQ_LEN * 4], "eval.passkey_depths": [0.0, 1.0],
    "eval.passkey_trials": 2, "eval.passkey_batch_size": 2, "eval.position_loss_length": TINY_SEQ_LEN * 4,
    "eval.position_loss_sequences": 1, "eval.position_loss_buckets": 6, "eval.chunk_tokens": 64,
}


def data_paths(tiny: bool) -> dict[str, str]:
    folder = f"{DATA}-tiny" if tiny else DATA
    seq_len = TINY_SEQ_LEN if tiny else SEQ_LEN
    return {"stdlib": f"{folder}/stdlib-byte-{seq_len}", "passkey": f"{folder}/passkey-byte-{seq_len}",
            "seq_len": str(seq_len)}


def prepare_data(root: Path, tiny: bool) -> dict[str, str]:
    """Stage 1 in `root`: stdlib shards and PassKey samples (each command skips finished work)."""
    paths = data_paths(tiny)
    python = [sys.executable, "-m"]
    _run(python + ["data_prep.shard", "--input", "stdlib", "--tokenizer", "byte", "--seq-len", paths["seq_len"],
                   "--output", paths["stdlib"], "--valid-fraction", str(VALID_FRACTION), "--no-progress"], root)
    samples = 64 if tiny else PASSKEY_SAMPLES
    _run(python + ["data_prep.passkey", "--tokenizer", "byte", "--seq-len", paths["seq_len"], "--samples",
                   str(samples), "--output", paths["passkey"]], root)
    return paths


def overrides(model: str, tiny: bool, extra: list[str]) -> list[str]:
    """The command-line overrides of one model's training: data paths (tiny), MLflow off without
    mlflow, then the caller's."""
    values: dict = {}
    if tiny:
        paths = data_paths(True)
        values = {key.split("@")[0]: value for key, value in TINY.items() if key.split("@")[-1] in (key, model)}
        values.update({
            "data.train_blend": [f"{paths['stdlib']}/train/manifest.json", f"{paths['passkey']}/train/manifest.json"],
            "data.valid_manifest": f"{paths['stdlib']}/valid/manifest.json",
            "eval.position_loss_manifest": f"{paths['stdlib']}/valid/manifest.json",
            "train.run_dir": f"runs/passkey-repro-tiny/{model}",
        })
    if importlib.util.find_spec("mlflow") is None:
        values["tracking.enabled"] = False
    return [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()] + extra


def train_all(root: Path, out: Path, tiny: bool, extra: list[str]) -> dict[str, int]:
    """Stage 2: both trainings, concurrently on GPUs 0 and 1 when two are visible; {model: exit status}."""
    gpus = _visible_gpus()
    concurrent = gpus >= 2
    print(f"training {', '.join(MODELS)} {'concurrently on GPUs 0 and 1' if concurrent else 'one after the other'}"
          f" ({gpus} GPU(s) visible)", flush=True)
    status, running = {}, {}
    for i, model in enumerate(MODELS):
        config = REPO / "configs" / "recipes" / f"passkey-{model}.yaml"
        command = [sys.executable, "-m", "pipeline.train", "--config", str(config), *overrides(model, tiny, extra)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if concurrent:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        log = open(out / f"train_{model}.log", "w")
        print(f"  {model}: {' '.join(command[1:])} > {log.name}", flush=True)
        running[model] = (subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        if not concurrent:
            status[model] = _wait(model, *running.pop(model))
    for model, (process, log) in running.items():
        status[model] = _wait(model, process, log)
    return status


def report(root: Path, out: Path, tiny: bool) -> dict:
    """Stage 3: each run's newest evaluation into `out`, with the comparison table and picture."""
    summary = {}
    for model in MODELS:
        run_dir = root / ("runs/passkey-repro-tiny" if tiny else "runs/passkey-repro") / model
        evals = sorted((run_dir / "eval").glob("step_*"))
        if not evals:
            summary[model] = {"error": f"no evaluation in {run_dir / 'eval'} (see train_{model}.log)"}
            continue
        newest = evals[-1]
        summary[model] = {"step": int(newest.name.split("_")[1]), "eval_dir": str(newest)}
        for name in ("passkey", "position_loss"):
            if (newest / f"{name}.json").is_file():
                summary[model][name] = json.loads((newest / f"{name}.json").read_text())
        if (run_dir / "summary.json").is_file():
            train = json.loads((run_dir / "summary.json").read_text())
            summary[model]["train"] = {k: train.get(k) for k in ("status", "step", "steps", "first_loss", "final_loss",
                                                                 "final_val_loss", "peak_gpu_gib")}
        for file in newest.iterdir():
            shutil.copy2(file, out / f"{model}_{file.name}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_table(summary))
    draw(out, summary)
    print(summary_table(summary), flush=True)
    return summary


def summary_table(summary: dict) -> str:
    """Markdown: PassKey accuracy per length (mean over depths) and per depth, FAM against BSWA."""
    lines = ["| model | step | status | " + " | ".join(_length_headers(summary)) + " |"]
    lines.append("|---" * (3 + len(_length_headers(summary))) + "|")
    for model, s in summary.items():
        cells = s.get("passkey", {}).get("cells", [])
        by_length: dict[int, list[float]] = {}
        for c in cells:
            by_length.setdefault(c["length"], []).append(c["accuracy"])
        accs = [f"{100 * sum(v) / len(v):.0f} %" for v in by_length.values()]
        lines.append(f"| {model} | {s.get('step', '-')} | {s.get('train', {}).get('status', s.get('error', '-'))} | "
                     + " | ".join(accs) + " |")
    lines.append("")
    for model, s in summary.items():
        if "passkey" not in s:
            continue
        p = s["passkey"]
        lines.append(f"{model}: accuracy (%) by depth (rows) and length (columns)")
        grid = {(c["length"], c["depth"]): c["accuracy"] for c in p["cells"]}
        lines.append("| depth | " + " | ".join(str(n) for n in p["lengths"]) + " |")
        lines.append("|---" * (1 + len(p["lengths"])) + "|")
        for d in p["depths"]:
            lines.append(f"| {round(100 * d)} % | " + " | ".join(f"{100 * grid[(n, d)]:.0f}" for n in p["lengths"]) + " |")
        lines.append("")
    return "\n".join(lines)


def draw(out: Path, summary: dict) -> None:
    """The pictures from the numbers: each model's heat map and both loss curves in one plot."""
    from pipeline.evaluation.plots import passkey_heatmap, position_loss_curve

    curves, training_length = {}, None
    for model, s in summary.items():
        if "passkey" in s:
            passkey_heatmap(s["passkey"], out / f"{model}_passkey_heatmap.png", f"{model}: PassKey accuracy (%)")
        if "position_loss" in s:
            curves[model] = s["position_loss"]
            training_length = s["position_loss"].get("training_length")
    if curves:
        position_loss_curve(curves, out / "position_loss_fam_vs_bswa.png", "loss by position on held-out stdlib",
                            training_length)


def _length_headers(summary: dict) -> list[str]:
    for s in summary.values():
        if "passkey" in s:
            return [f"{n:,} tokens" for n in s["passkey"]["lengths"]]
    return []


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable torch CUDA: train on what is there
        return 0


def _run(command: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run(command, cwd=cwd, env=env, check=True)


def _wait(model: str, process: subprocess.Popen, log) -> int:
    started = time.time()
    code = process.wait()
    log.close()
    print(f"  {model}: exit status {code} ({time.time() - started:.0f} s after waiting began)", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="python -m benchmarks.passkey_repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="folder that gets data/ and runs/ (default: here)")
    parser.add_argument("--out", default=None, help="report folder (default: <root>/runs/passkey-repro/report)")
    parser.add_argument("--tiny", action="store_true", help="every stage at a seconds-long size (CPU tests)")
    parser.add_argument("--report", action="store_true", help="only redraw the pictures from <out>/summary.json")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    root = Path(args.root).resolve()
    out = Path(args.out or root / ("runs/passkey-repro-tiny" if args.tiny else "runs/passkey-repro") / "report")
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        draw(out, json.loads((out / "summary.json").read_text()))
        return 0
    started = time.time()
    try:
        prepare_data(root, args.tiny)
    except subprocess.CalledProcessError as err:
        print(f"data preparation failed (exit status {err.returncode}): {' '.join(err.cmd[1:])}", file=sys.stderr)
        return 1
    status = train_all(root, out, args.tiny, extra)
    report(root, out, args.tiny)
    print(f"report in {out} ({time.time() - started:.0f} s in all)", flush=True)
    return 0 if all(code == 0 for code in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
