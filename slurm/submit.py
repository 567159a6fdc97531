"""`python -m slurm.submit`: render slurm/train.sbatch for a config and a node shape, check
the shape against the config's parallel sizes, print the script and submit it.

    python -m slurm.submit --config configs/fam-24b.yaml --nodes 8 --gpus-per-node 8 \
        --partition gpu --account llm --time 2-00:00:00 --data.train_manifest=/data/x/train/manifest.json
    python -m slurm.submit --config tiny --nodes 2 --gpus-per-node 0 --dry-run   # CPU: 1 process per node

The rendered script is train.sbatch with its #SBATCH block replaced by options derived from the
arguments and its `# @famtron-args@` line replaced by the training arguments, so it is
self-contained: a requeued job reruns it unchanged. `--dry-run` prints and stops; `--test-only`
asks the scheduler (`sbatch --test-only`) whether and when it would run, without submitting.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.load import load_config
from pipeline.config.rules import validate
from pipeline.config.tree import Config

TEMPLATE = Path(__file__).with_name("train.sbatch")
REPO = TEMPLATE.parent.parent
ARGS_MARKER = "# @famtron-args@"
DEFAULT_CPUS_PER_GPU = 8


@dataclass
class JobShape:
    nodes: int
    gpus_per_node: int  # 0: CPU nodes, one process each
    cpus_per_task: int
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str = "famtron"
    signal_seconds: int = 120
    log_dir: str = "logs"

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def time_limit_seconds(limit: str) -> int | None:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None: unlimited."""
    if limit.upper() in ("INFINITE", "UNLIMITED"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # with days the first field is hours
        parts = (parts + [0, 0])[:3]
        h, m, s = parts
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def check_shape(cfg: Config, shape: JobShape) -> None:
    """ValueError naming the numbers when the nodes' processes cannot hold TP x PP x DP."""
    tp, pp = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    world = shape.world_size
    how = f"--nodes {shape.nodes} x {shape.procs_per_node} process(es) per node = {world} processes"
    if shape.nodes < 1 or shape.gpus_per_node < 0:
        raise ValueError(f"--nodes must be >= 1 and --gpus-per-node >= 0, got {shape.nodes} and {shape.gpus_per_node}")
    if world % (tp * pp):
        raise ValueError(
            f"{how} cannot be split as parallel.tensor_parallel_size={tp} x parallel.pipeline_parallel_size={pp} "
            f"x DP: {world} is not a multiple of TP x PP = {tp * pp}"
        )
    if shape.gpus_per_node and tp > shape.gpus_per_node:
        raise ValueError(f"parallel.tensor_parallel_size={tp} spans more than one node ({shape.gpus_per_node} GPUs "
                         "per node): keep TP inside a node, where NVLink is")
    try:
        validate(cfg, world)
    except ValueError as err:
        raise ValueError(f"{how} (TP {tp} x PP {pp} x DP {world // (tp * pp)}): {err}") from None
    if shape.time:
        limit = time_limit_seconds(shape.time)
        if limit is not None and shape.signal_seconds >= limit:
            raise ValueError(f"--signal-seconds {shape.signal_seconds} must be less than --time {shape.time} "
                             f"({limit} s): the save-and-requeue warning would come before the job starts")


def sbatch_options(shape: JobShape) -> list[str]:
    """The #SBATCH lines of the rendered script."""
    opts = [f"--job-name={shape.job_name}", f"--nodes={shape.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={shape.cpus_per_task}"]
    if shape.gpus_per_node:
        opts.append(f"--gpus-per-node={shape.gpus_per_node}")
    opts += [f"--{name}={value}" for name, value in
             (("time", shape.time), ("partition", shape.partition), ("account", shape.account)) if value]
    opts += [f"--signal=B:USR1@{shape.signal_seconds}", "--requeue", "--open-mode=append",
             f"--output={shape.log_dir}/%x-%j.out", f"--chdir={os.getcwd()}"]
    return [f"#SBATCH {o}" for o in opts]


def render(shape: JobShape, train_args: list[str]) -> str:
    """train.sbatch with this job's #SBATCH block and training arguments."""
    lines = TEMPLATE.read_text().splitlines()
    header_end = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    body = [line for line in lines[header_end + 1 :] if not line.startswith("# (the #SBATCH block")]
    head = [line for line in lines[: header_end + 1] if not line.startswith("#SBATCH")]
    block = [
        "# rendered by: python -m slurm.submit " + shlex.join(sys.argv[1:]),
        f'export PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}"',
        f"export FAMTRON_NPROC_PER_NODE={shape.procs_per_node}",
        f"export FAMTRON_LOG_DIR={shlex.quote(shape.log_dir)}",
        "set -- " + shlex.join(train_args) + ' "$@"',
    ]
    out = []
    for line in head + sbatch_options(shape) + body:
        out.extend(block if line.startswith(ARGS_MARKER) else [line])
    return "\n".join(out) + "\n"


def submit(script: str, test_only: bool = False) -> subprocess.CompletedProcess:
    """sbatch with the script on stdin; returns the completed process (the caller reports)."""
    argv = ["sbatch", "--test-only"] if test_only else ["sbatch", "--parsable"]
    return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=120)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other --section.key=value arguments are config overrides "
                                "(python -m pipeline.train --help).")
    p.add_argument("--config", required=True, help="YAML file or config name (configs/<name>.yaml)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0: CPU nodes (gloo), one process per node")
    p.add_argument("--cpus-per-task", type=int,
                   help=f"CPUs of each node's task (default {DEFAULT_CPUS_PER_GPU} per GPU, 1 on CPU)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="Slurm time limit, e.g. 04:00:00 or 2-00:00:00")
    p.add_argument("--job-name", help="default: famtron-<tracking.run_name>")
    p.add_argument("--signal-seconds", type=int, default=120, help="USR1 this many seconds before the time limit")
    p.add_argument("--log-dir", default="logs", help="job and rank logs go to <log-dir>/<job id>/")
    p.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    p.add_argument("--test-only", action="store_true", help="sbatch --test-only: would it run, and when?")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        cpus = args.cpus_per_task or (DEFAULT_CPUS_PER_GPU * args.gpus_per_node or 1)
        shape = JobShape(args.nodes, args.gpus_per_node, cpus, args.time, args.partition, args.account,
                         args.job_name or f"famtron-{cfg.tracking.run_name}", args.signal_seconds, args.log_dir)
        check_shape(cfg, shape)
    except ValueError as err:
        print(f"slurm.submit: error: {err}", file=sys.stderr)
        return 2
    config_arg = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config
    script = render(shape, ["--config", config_arg, *overrides])
    print(script, end="")
    if args.dry_run:
        return 0
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
    result = submit(script, test_only=args.test_only)
    if result.returncode != 0:
        print(f"slurm.submit: sbatch rejected the job (exit {result.returncode}):\n{result.stderr.strip()}",
              file=sys.stderr)
        return result.returncode
    if args.test_only:  # sbatch --test-only answers on stderr
        print(result.stderr.strip(), file=sys.stderr)
        return 0
    job_id = re.split(r"[;\s]", result.stdout.strip())[0]
    print(f"submitted job {job_id}; logs: {args.log_dir}/{job_id}/ and {args.log_dir}/{shape.job_name}-{job_id}.out",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
