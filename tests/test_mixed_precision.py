"""train.precision=bf16-mixed (pipeline/training/precision.py): bf16 weights in the model, fp32
master weights, fp32 gradient accumulation, clipping and AdamW.

The chain: an independent reference step written here (fp32 masters updated from the bf16 model's
gradients, summed over micro-batches in fp32) ⇐ the plain step in one process ⇐ DP=2, PP=2 and TP=2 with SP
through `pipeline.train.run`; a bf16-mixed run resumed from its checkpoint equals the
uninterrupted run bit for bit. Two deliberately broken optimizers (bf16 accumulation; masters not
copied back) are run through the same comparison and must fail it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from model import build_model
from pipeline.config.load import load_config
from pipeline.train import run
from pipeline.training.fault import NonFiniteGuard
from pipeline.training.optim import is_no_decay
from pipeline.training.precision import MixedPrecisionOptimizer
from pipeline.training.step import StepBatch
from tests.conftest import tiny_overrides
from tests.spawn import run_on_ranks
from tests.test_train_parallel import SETTINGS, _final_params

MIXED = dict(train__precision="bf16-mixed")
STEPS, ACCUM, LR = 3, 2, 3e-3


# ---------------------------------------------------------------- the independent reference step


class ReferenceStep:
    """The bf16-mixed step from its definition: a bf16 copy of the fp32 initial weights runs forward
    and backward under autocast; each micro-batch's gradient is added into an fp32 sum; the sum is
    clipped by its global norm; AdamW updates fp32 masters; the bf16 weights are the masters rounded."""

    def __init__(self, cfg):
        self.model = build_model(dataclasses.replace(cfg.model, recompute=False), seed=cfg.train.seed)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.masters = {n: p.detach().clone().requires_grad_() for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.data = p.data.to(torch.bfloat16)
        o = cfg.optim
        decay = [m for n, m in self.masters.items() if not is_no_decay(n, m)]
        no_decay = [m for n, m in self.masters.items() if is_no_decay(n, m)]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.adamw = torch.optim.AdamW(groups, lr=LR, betas=tuple(o.betas), eps=o.eps)
        self.clip = o.grad_clip

    def step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float]:
        sums = {n: torch.zeros_like(m) for n, m in self.masters.items()}
        losses = []
        for tokens in micro_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = self.model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss
            (loss / len(micro_batches)).backward()
            losses.append(float(loss.detach()))
            for n, p in self.model.named_parameters():
                sums[n] += p.grad.float()
                p.grad = None
        norm = torch.sqrt(sum(g.pow(2).sum() for g in sums.values()))
        coef = (self.clip / (norm + 1e-6)).clamp(max=1.0)
        for n, m in self.masters.items():
            m.grad = sums[n] * coef
        self.adamw.step()
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self.masters[n])
        return sum(losses) / len(losses), float(norm)


def _config(shards: Path, run_dir: Path, **extra):
    batch = {"data__micro_batch_size": 2, "data__global_batch_size": 2 * ACCUM}
    return load_config(None, tiny_overrides(shards, run_dir, **{**batch, **MIXED, **extra}))


def _batches(vocab: int, seq: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [[torch.randint(0, vocab, (2, seq + 1), generator=gen) for _ in range(ACCUM)] for _ in range(STEPS)]


def compare_with_reference(shards: Path, run_dir: Path, optimizer_cls=MixedPrecisionOptimizer,
                           **extra) -> dict[str, float]:
    """Largest differences, over STEPS steps, between the plain step (one process, bf16-mixed, with
    `optimizer_cls`) and ReferenceStep on the same batches: relative loss and grad norm, absolute
    master weights and bf16 weights. `extra`: config overrides of the step (not of the reference)."""
    from pipeline.parallel.groups import stop_groups
    from pipeline.training import plain_step
    from pipeline.training.trainer import build_trainer, start

    cfg = _config(shards, run_dir, **extra)
    original = plain_step.MixedPrecisionOptimizer
    plain_step.MixedPrecisionOptimizer = optimizer_cls
    try:
        tr = build_trainer(cfg, start(cfg))
    finally:
        plain_step.MixedPrecisionOptimizer = original
    step, ref = tr.strategy, ReferenceStep(cfg)
    assert {p.dtype for p in step.model.parameters()} == {torch.bfloat16}
    errors = dict(loss=0.0, grad_norm=0.0, masters=0.0, weights=0.0)
    zeros = torch.zeros(2)
    for i, micro_batches in enumerate(_batches(cfg.model.vocab_size, cfg.data.seq_len)):
        got = step.run(StepBatch(micro_batches, [zeros] * ACCUM, False), LR, NonFiniteGuard(0), i + 1)
        loss, norm = ref.step(micro_batches)
        errors["loss"] = max(errors["loss"], abs(got.loss - loss) / loss)
        errors["grad_norm"] = max(errors["grad_norm"], abs(got.grad_norm - norm) / norm)
        masters = step.optimizer.with_masters(step.state_dict())
        weights = {n: p.detach() for n, p in step.model.named_parameters()}
        for n in ref.names:
            errors["masters"] = max(errors["masters"], float((masters[n] - ref.masters[n].detach()).abs().max()))
            bf16 = ref.model.get_parameter(n).detach()
            errors["weights"] = max(errors["weights"], float((weights[n].float() - bf16.float()).abs().max()))
    stop_groups()
    return errors


# The same math in another order: the step sums the loss and the clip's squared norms in another
# order (pipeline/training/optim.py grad_norm keeps TP-sharded and replicated parameters apart), so
# they differ in the last fp32 bits; the clip factor's few-ulp difference moves no master here.
# Measured: loss 4e-8, grad norm 6e-8 relative, masters and bf16 weights exactly equal. The broken
# optimizers below give: bf16 accumulation, grad norm 7e-5 and masters 2.5e-4 apart; masters not
# copied back, masters 1e-2 and weights 9e-3 apart (AdamW's first update is lr x sign(g)).
BOUNDS = dict(loss=1e-6, grad_norm=1e-6, masters=1e-7, weights=1e-7)  # 10-20x the measured, 70x under bf16 accumulation


def _beyond(errors: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in errors.items() if v > BOUNDS[k]}


@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_mixed_step_equals_the_reference_fp32_master_step(shards, tmp_path, one_torch_thread, recompute):
    """With recompute, megatron's checkpointed layers run their backward inside the outer one; the
    gradient hooks fire there and the numbers are the same (measured: the same figures as without)."""
    errors = compare_with_reference(shards, tmp_path / "run", model__recompute=recompute)
    assert not _beyond(errors), errors


class AccumulatesInBF16(MixedPrecisionOptimizer):
    """Broken on purpose: micro-batches summed in the bf16 .grad, converted to fp32 only at the end."""

    def _accumulate_hook(self, index: int):
        def hook(param):
            self.masters[index].grad = param.grad.float()  # param.grad stays and sums the next micro-batch in bf16

        return hook


class ForgetsToCopyBack(MixedPrecisionOptimizer):
    """Broken on purpose: AdamW updates the masters, the bf16 model keeps its initial weights."""

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()


@pytest.mark.parametrize("broken", [AccumulatesInBF16, ForgetsToCopyBack])
def test_reference_comparison_fails_a_broken_mixed_precision_optimizer(shards, tmp_path, one_torch_thread, broken):
    errors = compare_with_reference(shards, tmp_path / "run", broken)
    assert _beyond(errors), errors


def test_loading_weights_sets_the_fp32_masters_and_their_bf16_rounding(shards, tmp_path, one_torch_thread):
    """What a resharded resume and pipeline.import_hf load (PlainStep.load_weights): fp32 weights
    become the masters exactly and the model's weights their bf16 rounding; a load that reached only
    the bf16 weights would leave the masters at their initial values and the next update would undo it."""
    from pipeline.parallel.groups import stop_groups
    from pipeline.training.trainer import build_trainer, start

    cfg = _config(shards, tmp_path / "run")
    step = build_trainer(cfg, start(cfg)).strategy
    gen = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(v.shape, generator=gen) if k in dict(step.model.named_parameters()) else v
               for k, v in step.model.state_dict().items()}
    step.load_weights(weights)
    masters = step.optimizer.with_masters(step.state_dict())
    stop_groups()
    for name, param in step.model.named_parameters():
        assert torch.equal(masters[name], weights[name]), name
        assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), weights[name].to(torch.bfloat16)), name


# ---------------------------------------------------------------- layouts and resume through pipeline.train


def _worker(rank: int, world_size: int, shards: str, run_dir: str, extra: dict) -> dict:
    torch.set_num_threads(1)
    summary = run(load_config(None, tiny_overrides(Path(shards), Path(run_dir), **{**SETTINGS, **MIXED, **extra})))
    return {key: summary[key] for key in ("losses", "val_losses", "grad_norms", "last_checkpoint", "rsp_steps")}


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory) -> dict:
    """bf16-mixed in one process: 4 micro-batches of one sequence per step, RSP every step."""
    return run_on_ranks(_worker, 1, str(shards), str(tmp_path_factory.mktemp("mixed") / "run"), {})[0]


# DP=2 averages two fp32 sums of 2 micro-batches where one process sums 4, and PP=2 sums the same
# micro-batch gradients in the same fp32 order: both differ from one process in fp32 rounding only.
# Measured: DP=2 losses 8.6e-8 relative, grad norms and masters equal; PP=2 losses equal, grad norms
# 8.6e-8, masters 1.2e-7 apart. A master rounded across a bf16 boundary by such a difference would
# move one weight by a bf16 step, hence 1e-5 (100x the measured): still far under a summed instead of
# averaged DP gradient (grad norm x2) or a PP step that misses the schedule's 1/micro-batches (seen:
# grad norms 3.0 relative apart, losses only 1e-6: AdamW is blind to a gradient's scale).
LAYOUT_RTOL = 1e-5


# TP=2 (with SP) splits each GEMM: the row-parallel layers all-reduce partial sums of bf16 products,
# so TP differs from one process at bf16 rounding, not fp32. Measured: losses 5.6e-5, validation
# 4.8e-5, grad norms 1.2e-3 relative; bounds 5e-4 and 1e-2. The masters are not compared element by
# element there: AdamW moves a weight whose gradient is near zero by +-lr whatever the gradient's
# rounding (measured 6.7e-3 = 2.2 lr apart). What TP adds to bf16-mixed is the masters' TP flag for
# clipping: without it the sharded weights' squares are not summed over TP, a grad norm ~1/sqrt(2)
# as large for those, far outside 1e-2.
TP_RTOL = dict(losses=5e-4, val_losses=5e-4, grad_norms=1e-2)
LAYOUTS = {  # name: (overrides, TP size, PP size, bound per figure, masters compared)
    "pp2": (dict(parallel__pipeline_parallel_size=2), 1, 2, dict.fromkeys(TP_RTOL, LAYOUT_RTOL), True),
    "dp2": ({}, 1, 1, dict.fromkeys(TP_RTOL, LAYOUT_RTOL), True),
    "tp2_sp": (dict(parallel__tensor_parallel_size=2, parallel__sequence_parallel=True), 2, 1, TP_RTOL, False),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_mixed_dp2_pp2_and_tp2_match_one_process(shards, tmp_path, one_process, name):
    layout, tp, pp, bounds, same_masters = LAYOUTS[name]
    got = run_on_ranks(_worker, 2, str(shards), str(tmp_path / "run"), layout, timeout_seconds=600)[0]
    assert got["rsp_steps"] == one_process["rsp_steps"]
    for key, rtol in bounds.items():
        np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in one_process[key]], rtol=rtol, err_msg=key)
    final, expected = _final_params(got["last_checkpoint"], tp, pp), _final_params(one_process["last_checkpoint"], 1, 1)
    assert {v.dtype for v in final.values()} == {torch.float32}  # the checkpoint holds the fp32 masters
    assert final.keys() == expected.keys()
    for n, value in expected.items() if same_masters else ():
        np.testing.assert_allclose(final[n].numpy(), value.numpy(), rtol=LAYOUT_RTOL, atol=1e-6, err_msg=n)


def test_bf16_mixed_resume_is_bitwise(shards, tmp_path, one_process):
    """Stop after 2 steps with a checkpoint, resume for 2: the losses, grad norms and final fp32
    masters equal the uninterrupted run exactly (the bf16 weights are the masters rounded, so a
    resume that restored only the bf16 weights would lose the masters' low bits and differ)."""
    run_dir = str(tmp_path / "run")
    run_on_ranks(_worker, 1, str(shards), run_dir, dict(train__exit_after_steps=2))
    resumed = run_on_ranks(_worker, 1, str(shards), run_dir, {})[0]
    assert resumed["losses"] == one_process["losses"][2:]
    assert resumed["grad_norms"] == one_process["grad_norms"][2:]
    final = _final_params(resumed["last_checkpoint"], 1, 1)
    expected = _final_params(one_process["last_checkpoint"], 1, 1)
    assert all(torch.equal(final[name], value) for name, value in expected.items())


def test_bf16_mixed_dp2_skips_a_nan_step_without_touching_weights_masters_or_adamw_state(shards, tmp_path):
    """tests/test_nonfinite.py's faults (a NaN loss value; NaN gradients) on DP rank 1 at steps 2
    and 4: both ranks skip them, and the bf16 weights, the fp32 masters and AdamW's state are
    bitwise what they were (its snapshot reads them through the optimizer's param_groups and state)."""
    from tests.test_nonfinite import BAD_STEPS, _run as run_with_faults

    results = run_with_faults(shards, tmp_path / "run", 2, 1, **MIXED)
    for rank, r in enumerate(results):
        assert r["summary"]["status"] == "FINISHED" and r["summary"]["skipped_steps"] == len(BAD_STEPS), r["summary"]
        for step in BAD_STEPS:
            assert r["skipped"][step] and r["unchanged"][step], (rank, step)
        assert all(np.isfinite(w).all() for w in r["weights"].values())


def test_a_dropped_model_and_its_mixed_precision_optimizer_are_freed():
    """The gradient hooks live in autograd's C++ side, where the garbage collector sees no cycle: a
    hook that held the optimizer kept every dropped model, its masters and AdamW's state alive (on
    the H200, 21.6 GiB per benchmark cell of fam-1b, until the card ran out of memory)."""
    import gc
    import weakref

    from model import load_model_args
    from pipeline.config.tree import OptimConfig

    args = load_model_args("tiny")
    model = build_model(args, device="cpu")
    opt = MixedPrecisionOptimizer(model, OptimConfig(lr=1e-4), "cpu")
    tokens = torch.randint(0, args.vocab_size, (1, 65))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens[:, :-1], labels=tokens[:, 1:], return_logits=False).loss.backward()
    opt.step()
    alive = [weakref.ref(t) for t in (next(model.parameters()), opt.masters[0], opt.buffers[0], opt)]
    del model, opt
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * len(alive)
