"""Print a config's shape and parameter count: `python -m model.params fam-1b [more names]`.

Counts are computed from the shape (no weights are allocated), so the 24B config prints
instantly. "Nominal" is the size in the config's name; the paper's sizes exclude embeddings.
"""

from __future__ import annotations

import argparse
import sys

from model.config import CONFIG_DIR, describe, load_model_args, nominal_size


def report(name: str) -> str:
    args = load_model_args(name)
    layers = args.num_params()
    total = args.num_params(embeddings=True)
    line = f"{name:<12} {describe(args)}\n{'':<12} non-embedding {layers / 1e9:8.3f}B   with embeddings {total / 1e9:8.3f}B"
    nominal = nominal_size(name)
    if nominal:
        line += f"   nominal {nominal / 1e9:g}B ({(layers - nominal) / nominal:+.1%})"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.params", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="config names or YAML paths (default: every config in configs/)")
    names = parser.parse_args(argv).configs or sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    try:
        for name in names:
            print(report(name))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
