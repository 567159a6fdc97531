"""Whole training runs (pipeline.train.run, real shards) with long samples in micro-chunks (issue 14).

Exact mode trains the model that one whole call per sample trains: the losses, validation losses
(streamed micro-chunk by micro-chunk) and final weights of 6 steps agree with a run without
micro-chunks. A micro-chunked run stopped with a checkpoint after step 3 and resumed reproduces
the uninterrupted run bitwise (CPU, fp32), in both modes. A PP=2 run with truncated micro-chunks,
stopped and resumed, equals one process running them.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config.load import load_config
from pipeline.train import run
from tests.conftest import tiny_overrides
from tests.test_train_parallel import _final_params

CHUNK = 16  # model.block_size of tiny_overrides; data.seq_len 64: 4 micro-chunks per sample
# fp32. Per step the micro-chunked gradient differs from the whole call's by rounding (~6e-7 of
# each tensor's largest entry, tests/test_micro_chunks.py); six AdamW steps at lr 3e-3 amplify
# it where a gradient entry is near zero (AdamW divides by its root mean square), so weights are
# compared at 1e-4 of each tensor's largest entry, losses at 1e-5 (4.2 -> a few hundred ulps).
# Truncated gradients are visibly different (checked in tests/test_micro_chunk_steps.py).
LOSS_RTOL, WEIGHT_RTOL = 1e-5, 1e-4


def _run(shards, run_dir, **extra) -> dict:
    return run(load_config(None, tiny_overrides(shards, run_dir, **extra)))


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return _final_params(checkpoint, tp=1, pp=1)


def test_exact_micro_chunked_run_trains_the_whole_call_model(shards, tmp_path):
    whole = _run(shards, tmp_path / "whole")
    chunked = _run(shards, tmp_path / "chunked", train__micro_chunk_len=CHUNK)
    for key in ("losses", "val_losses"):  # [(step, loss)]
        assert [s for s, _ in chunked[key]] == [s for s, _ in whole[key]]
        assert [x for _, x in chunked[key]] == pytest.approx([x for _, x in whole[key]], rel=LOSS_RTOL), key
    assert whole["losses"][-1][1] < whole["losses"][0][1] - 0.3  # it trained: 5.55 -> 5.03 measured
    got = _weights(chunked["last_checkpoint"])
    for name, expected in _weights(whole["last_checkpoint"]).items():
        diff = (got[name] - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
        assert diff <= WEIGHT_RTOL, (name, float(diff))


@pytest.mark.parametrize("mode", ["exact", "truncated"])
def test_micro_chunked_run_resumes_with_the_same_losses(shards, tmp_path, mode):
    """Step 3 stops with a checkpoint, the second invocation resumes from it: the losses and
    weights are the uninterrupted run's, bit for bit."""
    keys = {"train__micro_chunk_len": CHUNK, "train__micro_chunk_mode": mode}
    straight = _run(shards, tmp_path / "straight", **keys)
    first = _run(shards, tmp_path / "split", train__exit_after_steps=3, **keys)
    assert first["status"] == "KILLED" and first["step"] == 3
    second = _run(shards, tmp_path / "split", **keys)
    assert second["step"] == 6
    assert first["losses"] + second["losses"] == straight["losses"]
    assert second["val_losses"] == straight["val_losses"][-1:]
    resumed = _weights(second["last_checkpoint"])
    for name, value in _weights(straight["last_checkpoint"]).items():
        assert torch.equal(value, resumed[name]), name


def test_pp2_truncated_run_stops_resumes_and_equals_one_process(shards, tmp_path):
    """pipeline.train at PP=2 with truncated micro-chunks (4 per sample, 16 schedule micro-batches
    per step, RSP every step, validation through the schedule), stopped after step 2 and resumed
    in new processes, against one process running the same truncated micro-chunks: losses,
    validation losses and final weights to 1e-5 (the bound of tests/test_train_parallel.py)."""
    from tests.spawn import run_on_ranks
    from tests.test_train_parallel import SETTINGS, _worker

    keys = {"train__micro_chunk_len": CHUNK, "train__micro_chunk_mode": "truncated"}
    one = run(load_config(None, tiny_overrides(shards, tmp_path / "one", **{**SETTINGS, **keys})))
    piped = {**keys, "parallel__pipeline_parallel_size": 2}
    first = run_on_ranks(_worker, 2, str(shards), str(tmp_path / "pp"), {**piped, "train__exit_after_steps": 2})[0]
    second = run_on_ranks(_worker, 2, str(shards), str(tmp_path / "pp"), piped)[0]
    for key in ("losses", "val_losses"):
        got = [v for _, v in first[key] + second[key]]
        assert got == pytest.approx([v for _, v in one[key]], rel=1e-5), key
    expected = _final_params(one["last_checkpoint"], 1, 1)
    got = _final_params(second["last_checkpoint"], 1, 2)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)
