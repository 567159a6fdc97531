"""A NaN/inf step is skipped in every layout: no change to weights or optimizer state, the batch
is consumed, the step is counted, and the run goes on exactly as one process that skipped the
same steps (pipeline/training/fault.py NonFiniteGuard, pipeline/training/step.py TrainStep.run,
pipeline/parallel/zero.py).

The test hook: FAMLanguageModel.lm_loss (the training path's loss, also the pipeline schedule's
loss_fn) is patched inside each worker process to turn non-finite on one rank at given steps,
as an fp overflow in one replica's micro-batch would: once as a NaN value whose gradients stay
finite (which DeepSpeed's own check cannot see), once times NaN (NaN gradients too). Layouts:
DP=2 with ZeRO-1, 2, 3 and 3 + optimizer offload (the fam-24b-4x80gb recipe's), PP=2 without
ZeRO and PP=2 with ZeRO-1 (the path that reduces after the schedule's backward). Reference: one
process with the same faults, whose skip is the plain loop's (no optimizer.step()).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpointing.files import verify_checkpoint
from tests.spawn import run_on_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned workers

BAD_STEPS = {2: "value", 4: "gradients"}  # 1-based step: how its loss turns non-finite (_poison_loss)
STEPS = 5
# 2 layers (PP=2: one per stage), micro-batches of one sequence, global batch 4: one process and
# PP=2 accumulate 4 micro-batches, DP=2 2 per rank. Every step starts from the saved FAM, so a
# skipped step that still saved its (NaN-born) FAM would show in the next losses.
# Checkpoints right after each skipped step (2 and 4) and at the end: saving after a skip works.
SETTINGS = dict(data__micro_batch_size=1, data__global_batch_size=4, train__steps=STEPS, optim__warmup_steps=1,
                train__rsp_probability=1.0, train__eval_interval_steps=0, data__valid_manifest=None,
                checkpoint__save_interval_steps=2)


def _poison_loss(bad_steps: dict[int, str], bad_rank: int, state: dict) -> None:
    """FAMLanguageModel.lm_loss turns non-finite on `bad_rank` during the steps of `bad_steps`
    (state["step"]: the step being run, set by the train_step wrapper), in two ways:
    "value": the loss is NaN but its gradients stay finite (NaN times a detached copy);
    "gradients": the loss times NaN, so its gradients are NaN as well, like a real overflow."""
    import torch.distributed as dist

    from model.language_model import FAMLanguageModel

    real = FAMLanguageModel.lm_loss

    def lm_loss(self, hidden, labels):
        loss = real(self, hidden, labels)
        kind = bad_steps.get(state["step"])
        if not torch.is_grad_enabled() or kind is None or dist.get_rank() != bad_rank:
            return loss
        return loss + loss.detach() * float("nan") if kind == "value" else loss * float("nan")

    FAMLanguageModel.lm_loss = lm_loss


def _optimizer_snapshot(tr) -> list[torch.Tensor]:
    """Every tensor an update would change on this rank: the working weights, and the weights the
    optimizer steps (ZeRO's fp32 partitions) with their AdamW state (step, exp_avg, exp_avg_sq)."""
    engine = getattr(tr.strategy, "engine", None)
    inner = tr.strategy.optimizer if engine is None else engine.optimizer.optimizer
    # ZeRO-3: a parameter's own tensor is empty or gathered by turns; its partition is ds_tensor.
    out = [getattr(p, "ds_tensor", p).detach().clone() for p in tr.strategy.model.parameters()]
    for group in inner.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())
            out.extend(v.detach().clone() for _, v in sorted(inner.state.get(p, {}).items()) if torch.is_tensor(v))
    return out


def _final_weights(tr) -> dict[str, np.ndarray]:
    """Full fp32 weights of this rank's TP=1 part under the plain model's names (collective under ZeRO)."""
    if getattr(tr.strategy, "engine", None) is not None:
        from pipeline.parallel.zero import full_fp32_state_dict

        return {k: v.numpy() for k, v in full_fp32_state_dict(tr.strategy.engine).items()}
    return {k: v.detach().float().numpy().copy() for k, v in tr.strategy.state_dict().items() if torch.is_tensor(v)}


def _worker(rank: int, world_size: int, shards: str, run_dir: str, extra: dict, bad_rank: int,
            bad_steps: dict[int, str]) -> dict:
    import pipeline.training.loop as train_module
    from pipeline.config.load import load_config
    from tests.conftest import tiny_overrides

    torch.set_num_threads(1)
    state = {"step": 0}
    _poison_loss(bad_steps, bad_rank, state)
    real_step, record = train_module.train_step, {"skipped": {}, "unchanged": {}}

    def train_step(tr, data_iter):
        state["step"] = step = tr.step + 1
        before = _optimizer_snapshot(tr) if step in bad_steps else None
        out = real_step(tr, data_iter)
        if before is not None:
            after = _optimizer_snapshot(tr)
            record["unchanged"][step] = len(before) == len(after) > 0 and all(map(torch.equal, before, after))
            record["skipped"][step] = out.skipped
        if step == STEPS:
            record["weights"] = _final_weights(tr)
        return out

    train_module.train_step = train_step
    cfg = load_config(None, tiny_overrides(Path(shards), Path(run_dir), **{**SETTINGS, **extra}))
    try:
        summary = train_module.run(cfg)
        record["summary"] = {k: summary[k] for k in ("status", "step", "losses", "grad_norms", "skipped_steps",
                                                     "last_checkpoint")}
    except FloatingPointError as err:
        record["error"] = str(err)
    return record


def _run(shards, run_dir, world_size: int, bad_rank: int = 0, bad_steps=BAD_STEPS, **extra) -> list[dict]:
    return run_on_ranks(_worker, world_size, str(shards), str(run_dir), extra, bad_rank, bad_steps, timeout_seconds=300)


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory) -> dict:
    return _run(shards, tmp_path_factory.mktemp("one") / "run", 1)[0]


LAYOUTS = {  # name: (world size, rank whose loss is poisoned, overrides)
    "dp2_zero1": (2, 1, dict(parallel__zero_stage=1)),
    "dp2_zero2": (2, 1, dict(parallel__zero_stage=2)),
    "dp2_zero3": (2, 1, dict(parallel__zero_stage=3)),
    "dp2_zero3_offload": (2, 1, dict(parallel__zero_stage=3, parallel__zero_offload_optimizer=True)),
    # rank 1 holds the last stage, where the loss is; the first stage's own gradients stay finite
    "pp2": (2, 1, dict(parallel__pipeline_parallel_size=2)),
    "pp2_zero1": (2, 1, dict(parallel__pipeline_parallel_size=2, parallel__zero_stage=1)),
}


def _merged_weights(results: list[dict]) -> dict[str, np.ndarray]:
    """The union over ranks (PP: each stage's layers; DP/TP=1: identical copies)."""
    out: dict[str, np.ndarray] = {}
    for r in results:
        out.update(r["weights"])
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_nan_step_changes_no_weight_or_optimizer_state_and_training_goes_on_as_one_process(
        layout, shards, one_process, tmp_path):
    """fp32 on CPU: the layouts only reorder sums (test_train_parallel.py: 1e-5). A step that
    updated with NaN gradients would leave NaN weights; one that skipped wrongly (stale gradients,
    a lost batch, a moved LR or RSP state) would change the later losses by ~1e-2."""
    world, bad_rank, extra = LAYOUTS[layout]
    results = _run(shards, tmp_path / "run", world, bad_rank, **extra)
    ref = one_process["summary"]
    assert ref["status"] == "FINISHED" and ref["skipped_steps"] == len(BAD_STEPS)
    assert [s for s, _ in ref["losses"]] == [s for s in range(1, STEPS + 1) if s not in BAD_STEPS]
    for who, r in [("one process", one_process)] + [(f"{layout} rank {i}", r) for i, r in enumerate(results)]:
        for step, kind in BAD_STEPS.items():
            assert r["skipped"][step], (who, step)
            assert r["unchanged"][step], f"{who}: weights or optimizer state changed in skipped step {step} ({kind})"
    for rank, r in enumerate(results):
        got = r["summary"]
        assert got["status"] == "FINISHED" and got["skipped_steps"] == len(BAD_STEPS), (layout, rank, got)
        assert got["last_checkpoint"].endswith(f"step_{STEPS:08d}")
        assert verify_checkpoint(got["last_checkpoint"]) is None
        assert [s for s, _ in got["losses"]] == [s for s, _ in ref["losses"]], (layout, rank)
        for key in ("losses", "grad_norms"):
            np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in ref[key]], rtol=1e-5,
                                       err_msg=f"{layout} rank {rank} {key}")
    weights, expected = _merged_weights(results), one_process["weights"]
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(weights[name], value, rtol=0, atol=1e-5, err_msg=f"{layout} {name}")


def test_too_many_nonfinite_steps_in_a_row_stop_a_zero_run_on_every_rank(shards, tmp_path):
    """train.max_nonfinite_steps under ZeRO: two NaN steps in a row with a limit of 1 end the run
    on both ranks with the guard's message (NaN loss values with finite gradients: the case
    DeepSpeed's own check would not see)."""
    results = _run(shards, tmp_path / "run", 2, 1, {2: "value", 3: "value"}, parallel__zero_stage=1,
                   train__max_nonfinite_steps=1)
    for rank, r in enumerate(results):
        assert "error" in r, (rank, r.get("summary"))
        assert "step 3: loss nan" in r["error"] and "2 non-finite steps in a row" in r["error"], r["error"]
        assert r["skipped"] == {2: True} and r["unchanged"] == {2: True}, rank


def test_deepspeed_overrides_that_disable_its_nonfinite_check_are_refused():
    from pipeline.config.load import load_config
    from pipeline.parallel.zero_config import to_deepspeed_config

    cfg = load_config(None, ["--parallel.zero_stage=2", "--data.micro_batch_size=2", "--data.global_batch_size=4"])
    for override in ({"bf16": {"check_grad_overflow": False}}, {"zero_optimization": {"compute_grad_norm": False}}):
        cfg.parallel.deepspeed_overrides = override
        with pytest.raises(ValueError, match=r"=false: it would let a NaN/inf step update the weights"):
            to_deepspeed_config(cfg, 2, True)
    cfg.parallel.deepspeed_overrides = {"bf16": {"check_grad_overflow": True}}
    to_deepspeed_config(cfg, 2, True)
