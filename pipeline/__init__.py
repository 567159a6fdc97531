"""famtron's training pipeline: config tree, optimizer and LR schedule, FLOPs, checkpoints,
MLflow tracking and the training entry point (`python -m pipeline.train`).

The model math lives in `model/`; the data side (shards and loaders) in `pipeline/data.py`.
"""
