"""The multi-GPU parity suite's comparison (benchmarks/parity_suite.py `compare`) on CPU cells: the
real one-process and plain DP=2 cells of benchmarks/parallel_parity.py (gloo, fp32, a tiny FAM
model) agree within the suite's bounds, and the same DP=2 cell with its gradient summed instead of
averaged (a bug planted in pipeline/parallel/collectives.py average_gradients) fails it, on the
gradient norm: AdamW is blind to the gradient's scale, so a loss-only comparison passed it."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from benchmarks.parity_suite import BOUNDS, cells_inductor_cache, compare, max_rel_diff, visible_devices
from tests.spawn import run_on_ranks

# Tiny FAM (block 128, F = 16, vocabulary 256 = bytes), 2 blocks per sequence, 4 sequences per step.
OPTS = dict(config="tiny", vocab_size=256, tp=1, pp=1, zero=0, seq_len=256, global_batch=4, steps=4, lr=3e-3,
            warmup_steps=2, seed=1234, recompute=False, out=None, eager_scan=False)


def _cell(rank: int, world_size: int, plant_summed_gradient: bool) -> dict:
    import torch.distributed as dist

    from benchmarks import parallel_parity
    from pipeline.parallel import collectives
    from pipeline.parallel.groups import stop_groups

    torch.set_num_threads(1)
    if plant_summed_gradient:
        def summed(params, dp_group):  # the bug: all-reduce without the division by the DP size
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=dp_group)

        collectives.average_gradients = summed
    result = parallel_parity.run(Namespace(**OPTS))
    stop_groups()
    return result


def _write(tmp_path: Path, name: str, result: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result))
    return path


def test_parity_compare_passes_dp2_and_fails_a_summed_dp_gradient(tmp_path):
    one = _write(tmp_path, "1gpu", run_on_ranks(_cell, 1, False)[0])
    dp2 = _write(tmp_path, "dp2", run_on_ranks(_cell, 2, False)[0])
    summed = _write(tmp_path, "dp2_summed", run_on_ranks(_cell, 2, True)[0])
    rows = {Path(r["layout"]).name + str(i): r for i, r in enumerate(compare([one, dp2, summed]))}
    base, good, bad = rows.values()
    assert base["parity_ok"] and good["parity_ok"], good["diffs"]
    # fp32 on CPU: DP=2 sums two halves where one process sums all four, ~1e-7 relative.
    assert all(good["diffs"][key] < 1e-5 for key in BOUNDS), good["diffs"]
    assert not bad["parity_ok"] and "grad_norms" in bad["failed"], bad["diffs"]
    assert abs(bad["diffs"]["grad_norms"] - 1.0) < 0.05  # twice the norm from step 2 on
    assert bad["diffs"]["losses"] < BOUNDS["losses"]  # the loss curve alone would have passed it


def test_the_warm_up_ramps_the_lr_linearly_then_holds_it():
    from benchmarks.parallel_parity import warmup_lr

    ramp = [warmup_lr(Namespace(lr=3e-4, warmup_steps=4), step) for step in range(6)]
    assert ramp == [3e-4 * n / 4 for n in (1, 2, 3, 4)] + [3e-4, 3e-4]
    assert warmup_lr(Namespace(lr=3e-4, warmup_steps=0), 0) == 3e-4


def test_max_rel_diff_leaves_out_step_1_and_fails_missing_figures():
    assert max_rel_diff([2.0, 1.0, 1.0], [1.0, 1.0, 1.001]) < 1e-3  # step 1 (2 vs 1) is left out
    assert max_rel_diff([1.0, 1.1], [1.0, 1.0]) == max_rel_diff([5.0, 1.1], [1.0, 1.0])
    for values in (None, [1.0], [1.0, None]):
        assert not max_rel_diff(values, [1.0, 1.0]) <= 1.0  # NaN: a cell without the figure fails


def test_a_cell_runs_on_the_gpus_this_process_sees():
    """A suite started on GPU 1 (CUDA_VISIBLE_DEVICES=1, beside a benchmark on GPU 0) runs its cells
    there, not on GPU 0; without the variable, indices are the GPUs."""
    assert visible_devices([0], {"CUDA_VISIBLE_DEVICES": "1"}) == "1"
    assert visible_devices([0, 1], {"CUDA_VISIBLE_DEVICES": "2,3"}) == "2,3"
    assert visible_devices([2, 3], {}) == "2,3"


def test_the_cells_compile_into_a_cache_of_their_own():
    """Not the cache `pytest -m gpu` fills (a Triton file missing from it crashed a cell twice)."""
    assert cells_inductor_cache({"TORCHINDUCTOR_CACHE_DIR": "/tmp/c"}) == "/tmp/c/parity-cells"
    assert cells_inductor_cache({}).endswith("runs/inductor-cache/parity-cells")


def test_a_torn_cell_file_is_refused_by_name(tmp_path):
    torn = tmp_path / "tp2.json"
    torn.write_text('{"gpus": 2, "losses": [1.0')
    with pytest.raises(SystemExit, match="tp2.json: not a parity cell's result"):
        compare([torn])
