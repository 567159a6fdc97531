"""How the model is spread over processes: process groups (`groups.py`, the one place they are
started), the collectives the training step uses (`collectives.py`), pipeline stages and their
schedules (`stages.py`), DeepSpeed ZeRO (`zero_config.py`, `zero.py`) and its view of megatron's
groups (`mpu.py`)."""
