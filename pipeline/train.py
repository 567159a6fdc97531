"""`python -m pipeline.train`: pretrain TransformerFAM (pipeline/training/cli.py; the loop is
pipeline/training/loop.py). `run(cfg)` trains from Python and returns the run's summary."""

import sys

from pipeline.training.cli import main
from pipeline.training.loop import run

__all__ = ["main", "run"]

if __name__ == "__main__":
    sys.exit(main())
