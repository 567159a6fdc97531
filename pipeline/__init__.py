"""famtron's training pipeline: config tree, optimizer and LR schedule, FLOPs, checkpoints,
MLflow tracking and the training entry point (`python -m pipeline.train`).

The model math lives in `model/`; the data side (shards and loaders) in `pipeline/data.py`.
"""

import warnings

# mlflow 3.17's sqlite store asks SQLAlchemy for a loader strategy SQLAlchemy has deprecated; a
# notice for mlflow, repeated for every logged batch. (Model-side notices: model/__init__.py.)
warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated", category=DeprecationWarning,
                        module=r"mlflow\.")
