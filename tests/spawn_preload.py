"""What the spawn server (tests/spawn.py) imports once, besides torch, megatron-core and famtron,
before it forks workers: DeepSpeed, where the workers will run its CPU accelerator.

DeepSpeed fixes its accelerator at import from DS_ACCELERATOR. The tests that run ZeRO on this CPU
machine set DS_ACCELERATOR=cpu when pytest imports them, before any worker starts, so the server
starts with it and its workers need not import DeepSpeed again (3.5-5 s of CPU each on CI's
machine). Without it (a GPU machine, one test file that runs no ZeRO) nothing is imported here, and
a worker imports DeepSpeed itself, for the accelerator of its own environment. Nothing here touches
CUDA or runs a torch op: a worker forked after that could not use the GPU or its thread pool.
"""

import os

if os.environ.get("DS_ACCELERATOR") == "cpu":
    import deepspeed  # noqa: F401
