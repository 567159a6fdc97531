"""famtron's training pipeline, one room per concern (the model math is model/):

    config/         the typed config tree, loading (defaults <- YAML <- CLI), the rules that span keys
    parallel/       process groups (started in one place), collectives, pipeline stages, ZeRO
    checkpointing/  atomic step folders, DeepSpeed's files, which checkpoint to resume from
    data/           shard loaders, blends, the inputs a run reads
    memory/         the per-GPU memory estimate (`python -m pipeline.memory`)
    training/       the loop, one step object per layout, optimizer, fault handling, MLflow, console
    hf/             Hugging Face export and import

Entry points are thin top-level modules: `python -m pipeline.train`, `python -m pipeline.memory`.
"""

import warnings

# mlflow 3.17's sqlite store asks SQLAlchemy for a loader strategy SQLAlchemy has deprecated; a
# notice for mlflow, repeated for every logged batch. (Model-side notices: model/__init__.py.)
warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated", category=DeprecationWarning,
                        module=r"mlflow\.")
