"""The per-GPU memory estimate of a training step: `estimate.py` (the terms summed into each
pipeline rank's peak, by phase), `terms.py` (the byte terms per micro-batch), `cli.py` (the
table; `python -m pipeline.memory --config <config> --dp N` runs it through `__main__.py`)."""
