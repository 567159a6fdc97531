"""The RSP state survives a change of layout under sequence parallelism (pipeline/trainer_state.py
`restore_resharded`). Under SP each TP rank saves only its F/tp rows of every layer's FAM
(model/layer.py `local_fam_rows`), so the whole FAM is the TP ranks' rows in rank order, and a
rank resuming under SP takes its own rows of it. Checked where it is used: the state `restore`
hands to the training loop (captured by wrapping pipeline.train.restore), against the whole FAM
the checkpoint holds, and the next step's loss (rsp_probability=1: it starts from that state)
against the uninterrupted one-process run's (tests/test_train_parallel.py's settings)."""

from __future__ import annotations

import numpy as np
import torch

import pipeline.training.loop as loop_module
from pipeline.checkpointing.files import load_file
from tests.spawn import run_on_ranks
from tests.test_train_parallel import _worker, reference  # noqa: F401 - `reference` is a fixture

FAM_LEN = 4  # tests/conftest.py tiny_overrides
# parallel.sequence_parallel may not change on resume (pipeline/config_checks.py) and needs TP > 1,
# and the tiny model's 2 heads allow TP <= 2: so SP stays on at TP=2 and the pipeline changes.
TP2_SP = dict(parallel__tensor_parallel_size=2, parallel__sequence_parallel=True)
TP2_PP2_SP = dict(TP2_SP, parallel__pipeline_parallel_size=2)


def _whole_fam(checkpoint: str, pp: int) -> list[np.ndarray]:
    """Every layer's saved FAM [F, 1, h] of a TP=2 SP checkpoint: the TP ranks' rows in rank order
    (each PP stage's file holds its own layers' FAM, the others None)."""
    fams = []
    for tp_rank in range(2):
        layers: dict[int, torch.Tensor] = {}
        for pp_rank in range(pp):
            name = f"model_tp{tp_rank:02d}" + (f"_pp{pp_rank:02d}" if pp > 1 else "") + ".pt"
            rsp = load_file(checkpoint, name)["rsp_state"]["layers"]
            layers.update({i: layer["fam"] for i, layer in enumerate(rsp) if layer["fam"] is not None})
        fams.append([layers[i] for i in sorted(layers)])
    return [torch.cat(rows).numpy() for rows in zip(*fams)]


def _capturing(real, restored: list):
    """The loop's restore (pipeline/training/run_files.py) that also appends (TP rank, the FAMs of
    the RSP state the step restored)."""

    def restore(tr, resume):
        saved = real(tr, resume)
        rsp = tr.strategy.rsp_state
        restored.append((tr.groups.tp_rank, [layer.fam.detach().cpu().numpy().copy() for layer in rsp.layers]))
        return saved

    return restore


def _resume_worker(rank: int, world_size: int, shards: str, run_dir: str, extra: dict) -> dict:
    restored: list = []
    loop_module.restore = _capturing(loop_module.restore, restored)  # a spawned process of its own
    out = _worker(rank, world_size, shards, run_dir, extra)
    return {**out, "tp_rank": restored[0][0], "restored": restored[0][1]}


def _assert_each_rank_got_its_rows(resumed: list[dict], whole: list[np.ndarray]) -> None:
    """Rank r of TP=2 under SP holds rows [r F/2, (r+1) F/2) of every layer's FAM, bit for bit: the
    FAM is copied, never computed, on resume."""
    rows = FAM_LEN // 2
    for result in resumed:
        r = result["tp_rank"]
        assert len(result["restored"]) == len(whole)
        for layer, (got, want) in enumerate(zip(result["restored"], whole)):
            assert np.array_equal(got, want[r * rows : (r + 1) * rows]), (r, layer)


def test_tp2_sp_checkpoint_resumes_under_another_pipeline_with_each_ranks_fam_rows(shards, reference, tmp_path):
    """TP=2 SP -> TP=2 x PP=2 SP (restore_resharded) -> TP=2 SP again. Step 3, the first after the
    change, starts from the restored FAM (rsp_probability=1), so its loss must be the uninterrupted
    one-process run's to 1e-5 relative (tests/test_train_parallel.py: TP and PP only reorder fp32
    sums); after the second change AdamW's restarted moments make step 4 differ, so there only the
    restored FAM is compared."""
    run_dir = str(tmp_path / "run")
    first = run_on_ranks(_worker, 2, str(shards), run_dir, {**TP2_SP, "train__exit_after_steps": 2})[0]
    whole = _whole_fam(first["last_checkpoint"], pp=1)
    assert all(fam.shape[0] == FAM_LEN for fam in whole)  # the two ranks' halves make the whole FAM
    resumed = run_on_ranks(_resume_worker, 4, str(shards), run_dir, {**TP2_PP2_SP, "train__exit_after_steps": 1})
    _assert_each_rank_got_its_rows(resumed, whole)
    assert all(r["losses"] == resumed[0]["losses"] for r in resumed)
    assert [s for s, _ in resumed[0]["losses"]] == [3]
    np.testing.assert_allclose(resumed[0]["losses"][0][1], reference["losses"][2][1], rtol=1e-5)

    whole = _whole_fam(resumed[0]["last_checkpoint"], pp=2)
    back = run_on_ranks(_resume_worker, 2, str(shards), run_dir, {**TP2_SP, "train__exit_after_steps": 1})
    _assert_each_rank_got_its_rows(back, whole)
    assert [s for s, _ in back[0]["losses"]] == [4]
