"""`python -m pipeline.train`: pretrain TransformerFAM, on one CPU process or under torchrun.

    python -m pipeline.train --config configs/demo.yaml [--section.key=value ...]
    torchrun --nproc_per_node 2 -m pipeline.train --config configs/demo.yaml --parallel.tensor_parallel_size=2
    python -m pipeline.train --config configs/demo.yaml --help   # every key, its value here and meaning

The loop is pipeline/training/loop.py; the config tree pipeline/config/.
"""

from __future__ import annotations

import argparse

from data_prep.cli import run_main
from pipeline.config.load import describe_keys, load_config
from pipeline.training.loop import run

PROG = "python -m pipeline.train"


def build_parser(cfg=None) -> argparse.ArgumentParser:
    """The command line; its epilog lists every key with cfg's value (the --config given) or the default."""
    source = "the values of --config and the overrides given" if cfg is not None else "their defaults"
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"overrides (--section.key=value), with {source}:\n" + describe_keys(cfg),
    )
    parser.add_argument("--config", help="YAML file or config name (configs/<name>.yaml); `base:` is followed")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (or FAMTRON_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """A user error (config, inputs, checkpoint) ends as one line and exit status 2, without a
    traceback unless --debug is given (data_prep/cli.py run_main)."""
    return run_main(_main, argv, prog=PROG)


def _main(argv: list[str]) -> int:
    helping = any(arg in ("-h", "--help") for arg in argv)
    args, overrides = build_parser().parse_known_args([arg for arg in argv if arg not in ("-h", "--help")])
    cfg = load_config(args.config, overrides)
    if helping:  # after loading, so the keys show the values this command line would train with
        build_parser(cfg).parse_args(["--help"])
    summary = run(cfg)  # checks the config rules and the inputs first, once (pipeline/training/trainer.py start)
    return 0 if summary["status"] in ("FINISHED", "KILLED") else 1
