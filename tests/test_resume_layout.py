"""The pipeline layout is safe to change on resume (pipeline/config/resume.py RESUME_SAFE_KEYS): a
PP=2 checkpoint whose stages hold 3 + 1 layers resumes with 1 + 3. Stage files carry global layer
names, so pipeline/training/plain_step.py PlainStep.restore reshards them like a TP/PP size change (weights, loader
and RSP state; AdamW moments restart) and the next step's loss is the uninterrupted run's."""

from __future__ import annotations

import numpy as np

from tests.spawn import run_on_ranks
from tests.test_train_parallel import _worker, reference  # noqa: F401 - `reference` is a fixture


def test_pp2_checkpoint_resumes_with_another_pipeline_layout_and_the_same_next_step_loss(shards, reference, tmp_path):
    """fp32 on CPU: a pipeline only reorders fp32 sums, so 1e-5 relative (test_train_parallel.py)."""
    pp2 = dict(parallel__pipeline_parallel_size=2)
    run_on_ranks(_worker, 2, str(shards), str(tmp_path / "run"),
                 {**pp2, "parallel__pipeline_layout": "[3, 1]", "train__exit_after_steps": 2}, timeout_seconds=300)
    resumed = run_on_ranks(_worker, 2, str(shards), str(tmp_path / "run"),
                           {**pp2, "parallel__pipeline_layout": "[1, 3]", "train__exit_after_steps": 1},
                           timeout_seconds=300)[0]
    assert [s for s, _ in resumed["losses"]] == [3]
    np.testing.assert_allclose(resumed["losses"][0][1], reference["losses"][2][1], rtol=1e-5)
