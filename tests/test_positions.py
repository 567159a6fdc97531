"""The RoPE positions training really uses, including the RPO offsets, per example and per rank.

RoPE sees only relative positions, so logits cannot tell whether an offset reached the model
(offsets [0, 321.25] against none differ by 1.7e-7). A spy on the RoPE angles the code computes
(tests/rope_spy.py), installed inside every process of `pipeline.train.run`, records the positions
of the tokens and FAM rows, step by step (computed once per forward and shared by the layers,
model/rope.py SharedTables: tests/test_rope.py checks that every layer gets them). Checks:
  * one process: micro-batch a, row j of step s sits at offset + index with offset =
    draw_step(seed, s).offsets[a * micro + j] (pipeline/training/draws.py, the paper's listing),
    and the FAM rows at model/reference.py's positions;
  * DP=2, PP=2 and DP=2 with ZeRO-2: each rank's rows carry the offset one process gave the same
    sample (matched by sample key, train.record_sample_keys), on every rank that runs a layer
    (under PP the second stage gets the positions from the first).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.spawn import run_on_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned workers

MICRO, GLOBAL, STEPS = 2, 4, 3
# With train.seed 1234 these steps draw offsets zero and non-zero, distinct within a micro-batch
# and between the DP ranks (asserted below), so a lost, shared or swapped offset shows.
SETTINGS = dict(data__micro_batch_size=MICRO, data__global_batch_size=GLOBAL, train__steps=STEPS,
                train__eval_interval_steps=0, data__valid_manifest=None, checkpoint__save_interval_steps=0,
                train__rpo=True)
# Positions are float32 in the model (offset + index): at offsets up to 2 pi 10^4 < 2^16 an
# index added to a float32 offset rounds by at most 2^-8 when it crosses 2^15.
POSITION_ATOL = 2**-7


def _record_positions(records: list, block_size: int, fam_len: int, accum: int,
                      shape_inference: bool) -> dict:
    """{step: [per micro-batch: row offsets]} from the spy's records, checking on the way that every
    layer of a micro-batch used the same token positions, offset + index, and the FAM rows the
    documented positions. `shape_inference`: a pipeline stage, whose schedule runs one extra forward
    (shape inference, on uninitialised inputs after the first stage) before the first step's
    micro-batches (pipeline/parallel/stages.py); its calls are dropped."""
    from tests.rope_spy import documented_fam_positions

    steps: dict[int, list] = {}
    step, calls = None, []
    for site, value in records + [("step", None)]:
        if site != "step":
            calls.append((site, value))
            continue
        if step is not None:
            # once per forward, shared by the stage's layers (model/rope.py SharedTables): the tokens' positions
            # (queries and keys alike), then the FAM query and key tables
            tokens = [v.T for s, v in calls if s == "model.rope"]  # split_qkv_rope: [S, b] -> [b, S]
            tables = [v for s, v in calls if s == "model.layer"]  # FAM query, key tables [b, T, F]
            if shape_inference and step == 1:
                tokens, tables = tokens[1:], tables[2:]
            assert len(tokens) == accum and len(tables) == 2 * accum, (step, len(calls))
            offsets = []
            for a in range(accum):
                pos = tokens[a]
                np.testing.assert_allclose(pos, pos[:, :1] + np.arange(pos.shape[1]), rtol=0, atol=POSITION_ATOL)
                fam_q, fam_k = documented_fam_positions(pos, block_size, fam_len)
                np.testing.assert_allclose(tables[2 * a], fam_q, rtol=0, atol=POSITION_ATOL)
                np.testing.assert_allclose(tables[2 * a + 1], fam_k, rtol=0, atol=POSITION_ATOL)
                offsets.append(pos[:, 0].tolist())
            steps[step] = offsets
        step, calls = value, []
    return steps


def _worker(rank: int, world_size: int, shards: str, run_dir: str, extra: dict) -> dict:
    import pipeline.training.loop as train_module
    from pipeline.config.load import load_config
    from tests import rope_spy
    from tests.conftest import tiny_overrides

    torch.set_num_threads(1)
    cfg = load_config(None, tiny_overrides(Path(shards), Path(run_dir), **{**SETTINGS, **extra},
                                           train__record_sample_keys=Path(run_dir) / "keys"))
    records: list = []
    real_step = train_module.train_step

    def train_step(tr, data_iter):
        records.append(("step", tr.step + 1))
        return real_step(tr, data_iter)

    undo = rope_spy.install(records)
    train_module.train_step = train_step
    try:
        summary = train_module.run(cfg)
    finally:
        train_module.train_step = real_step
        undo()
    p = cfg.parallel
    dp = world_size // (p.tensor_parallel_size * p.pipeline_parallel_size)
    meta = sum(1 for _, v in records if v is None)
    records = [(s, v) for s, v in records if v is not None]
    steps = _record_positions(records, cfg.model.block_size, cfg.model.fam_len, GLOBAL // (MICRO * dp),
                              shape_inference=p.pipeline_parallel_size > 1)
    return {"status": summary["status"], "steps": steps, "meta_calls": meta}


def _keys(run_dir: Path) -> dict:
    from pipeline.training.fault import read_sample_keys

    return {rank: {step: runs[0] for step, runs in by_step.items()} for rank, by_step in
            read_sample_keys(run_dir / "keys").items()}


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory) -> dict:
    """Sample key -> the offset one process gave it, checked against draw_step."""
    from pipeline.training.draws import draw_step

    run_dir = tmp_path_factory.mktemp("positions") / "one"
    result = run_on_ranks(_worker, 1, str(shards), str(run_dir), {}, timeout_seconds=300)[0]
    assert result["status"] == "FINISHED"
    keys = _keys(run_dir)[0]
    by_key = {}
    for step, micro_batches in result["steps"].items():
        draws = draw_step(1234, step - 1, GLOBAL, 10000.0, True, 0.8).offsets.tolist()
        flat = [o for mb in micro_batches for o in mb]  # micro-batch a, row j: global index a * MICRO + j
        assert flat == draws, (step, flat, draws)
        by_key.update(zip(keys[step], flat))
    offsets = [mb for step in result["steps"].values() for mb in step]
    assert any(mb[0] != mb[1] and min(mb) > 0 for mb in offsets)  # per-example, non-zero offsets
    assert any(max(mb) == 0 for mb in offsets)  # and steps without (RPO's zero half)
    return by_key


LAYOUTS = {  # name: (world size, overrides)
    "dp2": (2, {}),
    "pp2": (2, dict(parallel__pipeline_parallel_size=2)),
    "dp2_zero2": (2, dict(parallel__zero_stage=2)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_rotates_its_own_samples_at_their_rpo_offsets(layout, shards, one_process, tmp_path):
    world, extra = LAYOUTS[layout]
    results = run_on_ranks(_worker, world, str(shards), str(tmp_path / "run"), extra, timeout_seconds=300)
    keys = _keys(tmp_path / "run")
    per_rank = []
    for rank, result in enumerate(results):
        assert result["status"] == "FINISHED"
        assert sorted(result["steps"]) == list(range(1, STEPS + 1)), (layout, rank)
        for step, micro_batches in result["steps"].items():
            got = [o for mb in micro_batches for o in mb]
            want = [one_process[key] for key in keys[rank][step]]
            assert got == want, (layout, rank, step, got, want)
        per_rank.append([o for step in sorted(result["steps"]) for mb in result["steps"][step] for o in mb])
    if "parallel__pipeline_parallel_size" in extra:  # both stages rotate the same micro-batches
        assert per_rank[0] == per_rank[1]
    else:  # data parallel: the ranks held different samples, at different offsets
        assert per_rank[0] != per_rank[1]
