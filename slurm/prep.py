"""`python -m slurm.prep`: dataset sharding as a Slurm job array plus a dependent merge.

    python -m slurm.prep submit --tasks 3 [--partition P --account A --time T --dry-run] -- \
        --input data/raw --tokenizer byte --seq-len 512 --output data/raw-byte-512
    python -m slurm.prep merge --output OUT --num-tasks 3     # what the dependent job runs
    python -m slurm.prep validate OUT                         # check a finished output folder

`submit` sends slurm/prep.sbatch twice: an array of --tasks `shard` tasks, then a `merge` job
with `--dependency=afterok:<array id>`, so the merge runs only if every task succeeded; if one
fails the merge is cancelled (`--kill-on-invalid-dep`) rather than left pending forever.
Rerun `submit` with the same arguments: finished pack groups are skipped, so only the failed
task's share is redone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from data_prep.cli import UserError, run_main
from data_prep.manifest import MANIFEST_NAME, load_manifest, verify_shards

SCRIPT = Path(__file__).with_name("prep.sbatch")
REPO = SCRIPT.parent.parent
SPLITS = ("train", "valid")


def validate(output: str | Path) -> dict[str, dict]:
    """Load each split's merged manifest and check its shards (presence, size, sha256) and
    totals; returns {split: {"samples", "tokens", "shards"}}. Raises ValueError naming the problem."""
    summary = {}
    for split in SPLITS:
        path = str(Path(output) / split / MANIFEST_NAME)
        manifest = load_manifest(path)
        verify_shards(path, manifest, checksums=True)
        samples = sum(s["samples"] for s in manifest["shards"])
        tokens = sum(s["tokens"] for s in manifest["shards"])
        if samples != manifest["total_samples"] or tokens != manifest.get("total_tokens", tokens):
            raise ValueError(f"{path}: totals ({manifest['total_samples']} samples, {manifest.get('total_tokens')} "
                             f"tokens) disagree with its shards ({samples}, {tokens})")
        summary[split] = {"samples": samples, "tokens": tokens, "shards": len(manifest["shards"])}
    return summary


def merge_and_validate(output: str, num_tasks: int | None) -> dict[str, dict]:
    from data_prep.shard import merge

    merge(output, num_tasks)
    return validate(output)


def sbatch_argv(extra: list[str], options: argparse.Namespace) -> list[str]:
    argv = ["sbatch", "--parsable", f"--output={options.log_dir}/%x-%A_%a.out"]
    argv += [f"--{k}={v}" for k, v in (("partition", options.partition), ("account", options.account),
                                       ("time", options.time)) if v]
    return argv + extra


def submit(options: argparse.Namespace, shard_args: list[str]) -> tuple[str, str]:
    """Submit the array and the dependent merge; returns (array id, merge id)."""
    output = _output_of(shard_args)
    n = options.tasks
    array = sbatch_argv([f"--array=0-{n - 1}", str(SCRIPT), "shard", *shard_args], options)
    merge = sbatch_argv(["--dependency=afterok:{array}", "--kill-on-invalid-dep=yes", str(SCRIPT), "merge",
                         "--output", output, "--num-tasks", str(n)], options)
    if options.dry_run:
        print(shlex.join(array))
        print(shlex.join(merge).replace("{array}", "<array job id>"))
        return "", ""
    Path(options.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
    array_id = _sbatch(array)
    merge_id = _sbatch([a.replace("{array}", array_id) for a in merge])
    return array_id, merge_id


def _sbatch(argv: list[str]) -> str:
    # The jobs inherit this environment (sbatch --export=ALL): make `python -m data_prep...` importable
    # from any working directory, so relative --input/--output paths keep meaning the caller's.
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{path}" if path else str(REPO))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    if result.returncode != 0:
        raise UserError(f"sbatch rejected the job (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def _output_of(shard_args: list[str]) -> str:
    for i, arg in enumerate(shard_args):
        if arg == "--output" and i + 1 < len(shard_args):
            return shard_args[i + 1]
        if arg.startswith("--output="):
            return arg.split("=", 1)[1]
    raise ValueError("the data_prep.shard arguments after `--` need --output DIR")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm.prep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="array of shard tasks + dependent merge; data_prep.shard args after --")
    s.add_argument("--tasks", type=int, required=True, help="array size (parallel shard tasks)")
    for name in ("partition", "account", "time"):
        s.add_argument(f"--{name}")
    s.add_argument("--log-dir", default="logs")
    s.add_argument("--dry-run", action="store_true", help="print the two sbatch commands")
    m = sub.add_parser("merge", help="merge the task manifests, then validate")
    m.add_argument("--output", required=True)
    m.add_argument("--num-tasks", type=int)
    v = sub.add_parser("validate", help="check a merged output folder")
    v.add_argument("output")
    args, rest = p.parse_known_args(argv)
    if args.command == "submit":
        if args.tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {args.tasks}")
        array_id, merge_id = submit(args, [a for a in rest if a != "--"])
        if array_id:
            print(f"array job {array_id} (tasks 0-{args.tasks - 1}); merge job {merge_id} after it")
        return 0
    if rest:
        p.error(f"unexpected arguments {rest}")
    summary = (merge_and_validate(args.output, args.num_tasks) if args.command == "merge"
               else validate(args.output))
    for split, numbers in summary.items():
        print(f"{split}: {numbers['samples']} samples, {numbers['tokens']} tokens in {numbers['shards']} shards: ok")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m slurm.prep"))
