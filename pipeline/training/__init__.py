"""The training run: `loop.py` (what `python -m pipeline.train` runs, `cli.py` its command line),
`trainer.py` (groups, the layout's step, loaders), the step per layout (`step.py` the shared part,
`plain_step.py`, `zero_step.py`), `draws.py` (RPO/RSP), `evaluation.py`, `optim.py` (AdamW, LR,
clipping), `flops.py` (MFU), `fault.py` (signals, wall time, NaN/inf steps), `tracking.py`
(MLflow), `console.py` (rank-0 log and progress bar), `run_files.py` (checkpoints and the summary)."""
