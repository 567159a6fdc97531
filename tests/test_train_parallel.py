"""`pipeline.train.run` under pipeline parallelism and ZeRO equals one process: the loss of every
step, the validation loss and the final weights, with a 4-layer tiny model on the real shards
(tests/conftest.py). Cases: PP=2 1F1B, PP=2 interleaved 1F1B, TP=2 x PP=2, TP=2 with sequence
parallelism (alone, with PP=2, and with DP=2 under ZeRO-1/2/3), DP=2 ZeRO-1/2/3, PP=2 x DP=2
ZeRO-1; then resume of a PP=2 ZeRO-1 run and of a TP=2 x PP=2 checkpoint at TP=1 x PP=1 and the
other way round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.weights import merge_megatron_shards
from pipeline.checkpointing.files import MANIFEST, load_file, verify_checkpoint
from pipeline.config.load import load_config
from pipeline.train import run
from tests.conftest import tiny_overrides
from tests.spawn import run_on_ranks

# 4 layers (interleaving needs 2 ranks x 2 chunks), micro-batches of one sequence, global batch 4:
# one process accumulates 4, PP=2 runs 4 pipeline micro-batches, PP=2 x DP=2 runs 2 per replica.
# Every step starts from the saved FAM (rsp_probability=1), so the pipeline's RSP hand-off counts;
# validation after step 2 sits between two steps (the pipeline's eval re-infers shapes with an
# extra forward that must not become the RSP state).
SETTINGS = dict(model__num_layers=4, data__micro_batch_size=1, data__global_batch_size=4, train__steps=4,
                optim__warmup_steps=1, optim__grad_clip=0.5, train__rsp_probability=1.0, train__eval_steps=1,
                train__eval_interval_steps=2, checkpoint__save_interval_steps=0)


def _run(shards, run_dir, **extra) -> dict:
    return run(load_config(None, tiny_overrides(shards, run_dir, **{**SETTINGS, **extra})))


def _worker(rank: int, world_size: int, shards: str, run_dir: str, extra: dict) -> dict:
    torch.set_num_threads(1)
    summary = _run(Path(shards), Path(run_dir), **extra)
    keys = ("losses", "val_losses", "grad_norms", "last_checkpoint", "rsp_steps")
    return {key: summary[key] for key in keys}


def _final_params(checkpoint: str, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Full weights under the plain model's names: stage files carry global layer names (merged
    over PP by union), TP shards are merged by model.weights."""
    by_tp = []
    for tp_rank in range(tp):
        state = {}
        for pp_rank in range(pp):
            name = f"model_tp{tp_rank:02d}" + (f"_pp{pp_rank:02d}" if pp > 1 else "") + ".pt"
            state.update(load_file(checkpoint, name)["model"])
        by_tp.append({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return by_tp[0] if tp == 1 else merge_megatron_shards(by_tp)


CASES = {  # name: (world size, TP, PP, overrides)
    "pp2_1f1b": (2, 1, 2, dict(parallel__pipeline_parallel_size=2)),
    "pp2_interleaved": (2, 1, 2, dict(parallel__pipeline_parallel_size=2, parallel__virtual_stages=2,
                                      parallel__pipeline_schedule="interleaved_1f1b")),
    "tp2_pp2": (4, 2, 2, dict(parallel__tensor_parallel_size=2, parallel__pipeline_parallel_size=2)),
    "tp2_sp": (2, 2, 1, dict(parallel__tensor_parallel_size=2, parallel__sequence_parallel=True)),
    "tp2_pp2_sp": (4, 2, 2, dict(parallel__tensor_parallel_size=2, parallel__pipeline_parallel_size=2,
                                 parallel__sequence_parallel=True)),
    "tp2_sp_dp2_zero1": (4, 2, 1, dict(parallel__tensor_parallel_size=2, parallel__sequence_parallel=True,
                                       parallel__zero_stage=1)),
    "tp2_sp_dp2_zero2": (4, 2, 1, dict(parallel__tensor_parallel_size=2, parallel__sequence_parallel=True,
                                       parallel__zero_stage=2)),
    "tp2_sp_dp2_zero3": (4, 2, 1, dict(parallel__tensor_parallel_size=2, parallel__sequence_parallel=True,
                                       parallel__zero_stage=3)),  # ZeRO-3: weights not compared (partitioned)
    "dp2_zero1": (2, 1, 1, dict(parallel__zero_stage=1)),
    "dp2_zero2": (2, 1, 1, dict(parallel__zero_stage=2)),
    "dp2_zero3": (2, 1, 1, dict(parallel__zero_stage=3)),
    "pp2_dp2_zero1": (4, 1, 2, dict(parallel__pipeline_parallel_size=2, parallel__zero_stage=1)),
}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict:
    summary = _run(shards, tmp_path_factory.mktemp("one") / "run")
    return {**summary, "params": _final_params(summary["last_checkpoint"], 1, 1)}


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_training_matches_one_process_losses_and_weights(case, shards, reference, tmp_path):
    """fp32 on CPU. Pipelines, TP and the DP reduce only reorder fp32 sums (~1e-7 relative per
    step); AdamW over 4 steps may amplify that a little, so 1e-5 (relative for losses and norms,
    absolute for weights), far below the ~1e-2 of a wrong clip coefficient (clip 0.5 is active:
    norms are ~1), a lost micro-batch or a wrong RSP state."""
    world, tp, pp, extra = CASES[case]
    results = run_on_ranks(_worker, world, str(shards), str(tmp_path / case), extra)
    assert all(r["losses"] == results[0]["losses"] for r in results)  # every rank logs the same loss
    got = results[0]
    assert got["rsp_steps"] == reference["rsp_steps"] == 3
    for key in ("losses", "val_losses", "grad_norms"):
        np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in reference[key]], rtol=1e-5, err_msg=key)
    assert all(v > 0.5 for _, v in reference["grad_norms"])  # clipping was active
    if extra.get("parallel__zero_stage") == 3:  # weights only in DeepSpeed's partitions
        assert (Path(got["last_checkpoint"]) / "zero" / "famtron_zero.json").is_file()
        return
    params = _final_params(got["last_checkpoint"], tp, pp)
    assert params.keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=1e-5, msg=name)


def test_pp2_zero1_resumes_from_its_step_folder_like_the_uninterrupted_run(shards, reference, tmp_path):
    """Stop after step 2 (a checkpoint with stage files and DeepSpeed's `zero/` folder under one
    manifest), resume in new processes: losses and weights continue as one process's, to 1e-5."""
    extra = dict(parallel__pipeline_parallel_size=2, parallel__zero_stage=1)
    first = run_on_ranks(_worker, 2, str(shards), str(tmp_path / "run"), {**extra, "train__exit_after_steps": 2})[0]
    assert first["last_checkpoint"].endswith("step_00000002")
    files = json.loads((Path(first["last_checkpoint"]) / MANIFEST).read_text())["files"]
    assert {"model_tp00_pp00.pt", "model_tp00_pp01.pt", "zero/famtron_zero.json", "zero/manifest.json"} <= set(files)
    assert verify_checkpoint(first["last_checkpoint"]) is None
    second = run_on_ranks(_worker, 2, str(shards), str(tmp_path / "run"), extra)[0]
    losses = [v for _, v in first["losses"] + second["losses"]]
    np.testing.assert_allclose(losses, [v for _, v in reference["losses"]], rtol=1e-5)
    params = _final_params(second["last_checkpoint"], 1, 2)
    for name, value in reference["params"].items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=1e-5, msg=name)


def test_tp2_pp2_checkpoint_resumes_at_tp1_pp1_with_the_same_next_step_loss(shards, reference, tmp_path):
    """Stage files under global layer names, merged over PP and then TP (model.weights), load
    into one process. The next step's loss is computed before its update, so it must equal the
    uninterrupted run's (AdamW moments restart, so later steps are not compared)."""
    extra = dict(parallel__tensor_parallel_size=2, parallel__pipeline_parallel_size=2, train__exit_after_steps=2)
    run_on_ranks(_worker, 4, str(shards), str(tmp_path / "run"), extra)
    resumed = _run(shards, tmp_path / "run", train__exit_after_steps=1)
    assert [s for s, _ in resumed["losses"]] == [3]
    np.testing.assert_allclose(resumed["losses"][0][1], reference["losses"][2][1], rtol=1e-5)


def test_tp1_pp1_checkpoint_resumes_at_tp2_pp2_with_the_same_next_step_loss(shards, reference, tmp_path):
    """The other direction: one process's files are cut into TP shards (model.weights) and stage
    files by each of the four ranks; the next step's loss equals the uninterrupted run's."""
    _run(shards, tmp_path / "run", train__exit_after_steps=2)
    extra = dict(parallel__tensor_parallel_size=2, parallel__pipeline_parallel_size=2, train__exit_after_steps=1)
    resumed = run_on_ranks(_worker, 4, str(shards), str(tmp_path / "run"), extra)
    assert all(r["losses"] == resumed[0]["losses"] for r in resumed)
    assert [s for s, _ in resumed[0]["losses"]] == [3]
    np.testing.assert_allclose(resumed[0]["losses"][0][1], reference["losses"][2][1], rtol=1e-5)
