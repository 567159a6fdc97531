"""What lets a model larger than one GPU train under ZeRO-3 (configs/recipes/fam-24b-4x80gb.yaml):
the model is built already partitioned (DeepSpeed's zero.Init, pipeline/parallel/zero.py build_zero3_init)
with the plain build's weights, and the optimizer offloaded to the host (ZeRO-Offload) trains
like one process through `pipeline.train.run`. Also the run-level switches the GPU probe
(benchmarks/big_step.sh) relies on: no checkpoints, and the peak-memory figures in the summary.

On this CPU machine DeepSpeed's accelerator is the CPU (DS_ACCELERATOR=cpu), so "offloaded" state
lives where it would anyway; what the test checks is that DeepSpeed takes its offload path (its
CPU-side fp32 partitions, gradient buffers and the torch AdamW stepping them) and that the numbers
equal one process's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config.load import load_config
from pipeline.train import run
from tests.conftest import tiny_overrides
from tests.spawn import run_on_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned workers

# As tests/test_train_parallel.py: 4 layers, micro-batches of one sequence, global batch 4, every
# step from the saved FAM, clipping active (norms ~1 > 0.5), validation between steps.
SETTINGS = dict(model__num_layers=4, data__micro_batch_size=1, data__global_batch_size=4, train__steps=4,
                optim__warmup_steps=1, optim__grad_clip=0.5, train__rsp_probability=1.0, train__eval_steps=1,
                train__eval_interval_steps=2, checkpoint__save_interval_steps=0)
OFFLOAD = dict(parallel__zero_stage=3, parallel__zero_offload_optimizer=True)


def _run(shards, run_dir, **extra) -> dict:
    return run(load_config(None, tiny_overrides(shards, run_dir, **{**SETTINGS, **extra})))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict:
    """One process, no checkpoints."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return {**_run(shards, run_dir, checkpoint__enabled=False), "run_dir": run_dir}


def test_run_without_checkpoints_writes_none_and_reports_peak_memory(reference):
    assert reference["status"] == "FINISHED" and reference["last_checkpoint"] == "None"
    assert not (reference["run_dir"] / "checkpoints").exists()
    assert reference["peak_gpu_gib"] is None  # CPU run
    # One process: its host is its own. A Python process with torch and megatron imported holds
    # a few hundred MiB at least, and less than this machine's RAM (ru_maxrss is KiB, not bytes).
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert 0.1 < reference["peak_host_gib"] == reference["peak_host_node_gib"] < ram_gib


def _offload_worker(rank: int, world_size: int, shards: str, run_dir: str) -> dict:
    torch.set_num_threads(1)
    summary = _run(Path(shards), Path(run_dir), **OFFLOAD)
    return {key: summary[key] for key in ("losses", "val_losses", "grad_norms", "rsp_steps", "last_checkpoint",
                                          "peak_host_gib", "peak_host_node_gib")}


def _probe_worker(rank: int, world_size: int, shards: str, run_dir: str) -> dict:
    """What DeepSpeed made of the same config (new processes: a process group is set up once per
    process here, as under torchrun)."""
    from pipeline.parallel.groups import stop_groups
    from pipeline.training.trainer import build_trainer, start

    cfg = load_config(None, tiny_overrides(Path(shards), Path(run_dir), **{**SETTINGS, **OFFLOAD}))
    tr = build_trainer(cfg, start(cfg))
    engine = tr.strategy.engine
    zero = engine.optimizer  # DeepSpeedZeroOptimizer_Stage3
    out = dict(offload=bool(zero.offload_optimizer), optimizer=type(zero.optimizer).__name__,
               fp32_devices=sorted({str(t.device) for t in zero.fp32_partitioned_groups_flat}))
    engine.destroy()
    stop_groups()
    return out


def test_dp2_zero3_offload_matches_one_process_losses(shards, reference, tmp_path):
    """fp32 on CPU; ZeRO-3 reorders the DP reductions only, so 1e-5 relative as in
    tests/test_train_parallel.py, far below a wrong clip (~1e-2), a lost micro-batch or another
    initial weight (zero.Init must draw the plain build's values)."""
    results = run_on_ranks(_offload_worker, 2, str(shards), str(tmp_path / "zero3"))
    got = results[0]
    assert got["rsp_steps"] == reference["rsp_steps"] == 3
    for key in ("losses", "val_losses", "grad_norms"):
        np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in reference[key]], rtol=1e-5, err_msg=key)
    assert (Path(got["last_checkpoint"]) / "zero" / "famtron_zero.json").is_file()  # an offloaded ZeRO-3 save
    # Both ranks on this host: their sum lies between the larger one and twice it.
    assert 0 < got["peak_host_gib"] < got["peak_host_node_gib"] <= 2 * got["peak_host_gib"]
    probe = run_on_ranks(_probe_worker, 2, str(shards), str(tmp_path / "probe"))[0]
    assert probe["offload"] and probe["optimizer"] == "AdamW" and probe["fp32_devices"] == ["cpu"]


def _init_worker(rank: int, world_size: int) -> dict:
    import deepspeed

    from model import build_model
    from pipeline.config.load import load_config
    from pipeline.config.tree import OptimConfig
    from pipeline.parallel.groups import start_groups, stop_groups
    from pipeline.parallel.mpu import MegatronMPU
    from pipeline.parallel.zero import build_zero3_init
    from pipeline.parallel.zero_config import to_deepspeed_config
    from pipeline.training.optim import build_optimizer
    from tests.test_reference import small_args

    groups = start_groups()
    args = small_args(num_layers=2)
    plain = build_model(args, seed=7, tp_group=groups.tp_group)
    cfg = load_config(None, ["--parallel.zero_stage=3", "--parallel.zero_offload_optimizer=true",
                             "--data.micro_batch_size=1", f"--data.global_batch_size={world_size}"])
    with build_zero3_init(to_deepspeed_config(cfg, world_size, bf16=False), MegatronMPU.from_groups(groups)):
        model = build_model(args, seed=7, tp_group=groups.tp_group)
    params = list(model.parameters())
    shards_only = all(p.numel() == 0 and 0 < p.ds_tensor.numel() <= -(-p.ds_numel // world_size) for p in params)
    groups = [len(g["params"]) for g in build_optimizer(model, OptimConfig()).param_groups]
    with deepspeed.zero.GatheredParameters(params):
        same = all(torch.equal(p, dict(plain.named_parameters())[name]) for name, p in model.named_parameters())
    stop_groups()
    return {"shards_only": shards_only, "same": same, "groups": groups,
            "plain_groups": [len(g["params"]) for g in build_optimizer(plain, OptimConfig()).param_groups]}


def test_zero3_init_builds_the_plain_weights_already_partitioned():
    for got in run_on_ranks(_init_worker, 2):
        assert got["shards_only"]  # no rank ever held the whole model after construction
        assert got["same"]  # gathered, bit for bit the weights of build_model without zero.Init
        # The same decay / no-decay split: zero.Init leaves each parameter's .data empty (1-D), so
        # pipeline/training/optim.py reads the real shape, or no matrix would be decayed.
        assert got["groups"] == got["plain_groups"] == [2 * 4 + 2, 2 * 2 + 1 + 1]
