"""Long samples in micro-chunks through the training step (issue 14; train.micro_chunk_len).

Each case runs two optimizer steps of a layout's step object (pipeline/training/trainer.py
build_step: PlainStep, PipelineStep, ZeroStep), the second from the RSP state, with RPO offsets
per row and two micro-batches per step (accumulation: every sample restarts its state), and
compares the loss and every parameter's update with another step object's on the same batches:
    exact mode      == the same layout without micro-chunks (one whole call per sample):
                       FAM, BSWA, a partial last block, boundary states in host memory,
                       TP=2, SP at TP=2, ZeRO-1 at DP=2;
    truncated, PP=2 == one process (PlainStep) running the same truncated micro-chunks:
                       1F1B, interleaved 1F1B, GPipe and 1F1B under ZeRO-1, whose per-stage forward
                       order is recorded;
    truncated       == a reference that detaches the state at every boundary (model calls).
The optimizer is made to step by the gradient itself: AdamW with betas (0, 0), no weight decay
and lr = eps = 1e6 moves each weight by lr * g / (|g| + eps) = g (1 - |g|/1e6), so the update of
each weight is its reduced gradient (through clipping, DeepSpeed's reduce and step), and two
runs' updates differ where their gradients differ. Each case also compares the validation loss
of the last batch (streamed micro-chunk by micro-chunk; under PP through the schedule).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.spawn import run_on_ranks
from tests.test_reference import small_args

SAMPLES, MICRO = 4, 2  # per step: 2 micro-batches of 2 sequences at DP=1, 1 per rank at DP=2
LR = EPS = 1e6  # the update of each weight is its gradient (module docstring)
# fp32. Micro-chunks compute the whole call's gradient in another order: measured at most 6e-7
# of each tensor's largest entry (tests/test_micro_chunks.py), so 1e-5 of the largest update.
# The update is read as (weight after) - (weight before), each rounded to fp32: up to one ulp of
# the weight's magnitude (norm weights are 1, their updates ~1e-3) on top. A lost state gradient
# moves some update by 0.86 of its largest entry, a wrong chunk weighting by 0.39.
RTOL = 1e-5
ULPS = 2 * float(np.finfo(np.float32).eps)
LOSS_TOL = 4e-6  # a few ulps of a loss ~4.2 (the chunk weighting's extra roundings)


def _config(seq: int, chunk: int, mode: str = "exact", world: int = 1, offload: bool = False, **parallel):
    from pipeline.config.rules import validate
    from pipeline.config.tree import Config

    cfg = Config()
    model = parallel.pop("model", {})
    cfg.model = small_args(**{"num_layers": 4, **model})
    cfg.data.train_manifest = "unused"
    cfg.data.seq_len, cfg.data.micro_batch_size, cfg.data.global_batch_size = seq, MICRO, SAMPLES
    o = cfg.optim
    o.betas, o.eps, o.weight_decay, o.grad_clip, o.warmup_steps = [0.0, 0.0], EPS, 0.0, 0.0, 0
    cfg.train.micro_chunk_len, cfg.train.micro_chunk_mode = chunk, mode
    cfg.train.micro_chunk_offload_states = offload and bool(chunk)
    cfg.train.device, cfg.train.dtype = "cpu", "fp32"
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    validate(cfg, world)
    return cfg


def _batches(seq: int, step: int, dp_rank: int, dp: int, accum: int):
    """This rank's micro-batches of step `step`: rows (a * dp + r) * MICRO + j of the step's
    samples, as pipeline/training/draws.py orders them; RPO offsets per row."""
    from pipeline.training.step import StepBatch

    g = torch.Generator().manual_seed(100 + step)
    samples = torch.randint(0, 64, (SAMPLES, seq + 1), generator=g)
    offsets = torch.arange(SAMPLES, dtype=torch.float32) * 37.5 + 3.0
    rows = [slice((a * dp + dp_rank) * MICRO, (a * dp + dp_rank + 1) * MICRO) for a in range(accum)]
    return StepBatch([samples[r] for r in rows], [offsets[r] for r in rows], use_saved_fam=step == 2)


def _weights(strategy) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in strategy.state_dict().items()
            if not k.endswith("_extra_state") and v is not None}


def _step_worker(rank, world_size, cfg, record_order=False):
    from pipeline.config.rules import grad_accumulation_steps
    from pipeline.parallel.groups import start_groups, stop_groups
    from pipeline.parallel.stages import FAMStage
    from pipeline.training.fault import NonFiniteGuard
    from pipeline.training.step import evaluating
    from pipeline.training.trainer import build_step

    order: list = []
    if record_order:  # which micro-chunk each stage's forwards saw, in the order they ran
        plain_forward = FAMStage.forward

        def spy(self, x, positions, chunk_index=None):
            if chunk_index is not None and not torch.isnan(chunk_index).any():
                order.append((self.part.layer_range.start, float(chunk_index[0])))
            return plain_forward(self, x, positions, chunk_index)

        FAMStage.forward = spy
    p = cfg.parallel
    groups = start_groups(p.tensor_parallel_size, p.pipeline_parallel_size, "gloo", device="cpu")
    accum = grad_accumulation_steps(cfg, world_size)
    strategy = build_step(cfg, groups, accum)
    before, losses = _weights(strategy), []
    guard = NonFiniteGuard(0)
    for step in (1, 2):
        batch = _batches(cfg.data.seq_len, step, groups.dp_rank, groups.dp_size, accum)
        losses.append(strategy.run(batch, LR, guard, step).loss)
        if step == 1:
            after_one = _weights(strategy)
    trained = list(order)  # the training forwards' (validation runs more below)
    with evaluating(strategy.model):  # validation streams the samples the same way (no RSP, no RPO)
        evals = [float(x) for x in strategy.eval_losses(batch.tokens)]
    result = {"tp": groups.tp_rank, "pp": groups.pp_rank, "dp": groups.dp_rank, "losses": losses,
              "before": before, "after_one": after_one, "after_two": _weights(strategy), "order": trained,
              "eval": evals}
    stop_groups()
    return result


def _run(cfg, world_size=1, record_order=False) -> dict:
    """{tp_rank: merged result of DP rank 0's pipeline stages}."""
    out: dict = {}
    for r in run_on_ranks(_step_worker, world_size, cfg, record_order):
        if r["dp"]:
            continue
        merged = out.setdefault(r["tp"], {"losses": r["losses"], "before": {}, "after_one": {}, "after_two": {},
                                          "order": {}, "eval": []})
        merged["eval"] += r["eval"]  # the last pipeline stage's losses (per micro-batch or micro-chunk)
        for key in ("before", "after_one", "after_two"):
            merged[key].update(r[key])
        merged["order"][r["pp"]] = r["order"]
    return out


def _assert_same_steps(got: dict, expected: dict) -> None:
    for tp_rank, e in expected.items():
        g = got[tp_rank]
        assert np.allclose(g["losses"], e["losses"], rtol=0, atol=LOSS_TOL), (g["losses"], e["losses"])
        # equal micro-chunks: the mean of their means is the samples' mean
        assert abs(np.mean(g["eval"]) - np.mean(e["eval"])) <= LOSS_TOL, (g["eval"], e["eval"])
        assert g["before"].keys() == e["before"].keys()
        for name, start in e["before"].items():
            np.testing.assert_array_equal(g["before"][name], start)  # the same initial weights
            for key, prev in (("after_one", start), ("after_two", e["after_one"][name])):
                update, expected_update = g[key][name] - prev, e[key][name] - prev
                scale = max(np.abs(expected_update).max(), 1e-12)
                bound = RTOL * scale + ULPS * np.abs(prev).max()
                assert np.abs(update - expected_update).max() <= bound, (name, key, np.abs(update - expected_update)
                                                                         .max() / scale)


EXACT_CASES = {  # name -> (config keywords, world size); every case has >= 4 micro-chunks per sample
    "fam": (dict(seq=40, chunk=8), 1),
    "bswa (F = 0)": (dict(seq=32, chunk=8, model={"fam_len": 0}), 1),
    "fam, partial last block": (dict(seq=37, chunk=8), 1),
    "fam, boundary states offloaded": (dict(seq=40, chunk=8, offload=True), 1),
    "fam, TP=2": (dict(seq=32, chunk=8, tensor_parallel_size=2), 2),
    "fam, SP at TP=2": (dict(seq=32, chunk=8, tensor_parallel_size=2, sequence_parallel=True), 2),
    "fam, ZeRO-1 at DP=2": (dict(seq=32, chunk=8, zero_stage=1), 2),
}


@pytest.mark.parametrize("case", EXACT_CASES, ids=list(EXACT_CASES))
def test_exact_micro_chunks_through_the_step_equal_one_whole_call_per_sample(case):
    keywords, world = EXACT_CASES[case]
    chunked = _run(_config(**keywords, world=world), world)
    whole = _run(_config(**{**keywords, "chunk": 0}, world=world), world)
    _assert_same_steps(chunked, whole)


def _pp(schedule: str) -> dict:
    virtual = 2 if schedule == "interleaved_1f1b" else 1
    return dict(pipeline_parallel_size=2, pipeline_schedule=schedule, virtual_stages=virtual)


@pytest.mark.parametrize("schedule, zero_stage", [("1f1b", 0), ("interleaved_1f1b", 0), ("gpipe", 0), ("1f1b", 1)])
def test_truncated_micro_chunks_at_pp2_equal_one_process_running_them(schedule, zero_stage):
    keywords = dict(seq=32, chunk=8, mode="truncated")
    piped = _run(_config(**keywords, world=2, zero_stage=zero_stage, **_pp(schedule)), 2, record_order=True)
    one = _run(_config(**keywords))
    _assert_same_steps(piped, one)
    # Each stage ran its micro-chunks 0..K-1 in order, once per sample (2 micro-batches x 2 steps),
    # for the training forwards (shape inference, on uninitialised indices, is not counted).
    for pp_rank, seen in piped[0]["order"].items():
        for first_layer in {layer for layer, _ in seen}:
            chunks = [k for layer, k in seen if layer == first_layer]
            assert chunks[-16:] == [0.0, 1.0, 2.0, 3.0] * 4, (pp_rank, first_layer, chunks)


def test_truncated_mode_differs_from_exact_only_by_the_cut_at_the_boundaries():
    """Truncated micro-chunks through the step equal a reference that calls the model chunk by
    chunk with the state detached at every boundary, and differ from exact mode."""
    result = run_on_ranks(_detached_reference_worker, 1)[0]
    assert result["truncated_vs_detached"] <= RTOL, result
    assert abs(result["loss_truncated"] - result["loss_detached"]) <= LOSS_TOL, result
    assert result["truncated_vs_exact"] > 0.01, result  # the cut is visible


def _detached_reference_worker(rank, world_size):
    from model import build_model
    from pipeline.parallel.groups import start_groups, stop_groups
    from pipeline.training.trainer import build_step

    groups = start_groups(1, 1, "gloo", device="cpu")
    out = {}
    grads = {}
    for mode in ("truncated", "exact"):
        cfg = _config(seq=32, chunk=8, mode=mode)
        strategy = build_step(cfg, groups, 2)
        batch = _batches(32, 1, 0, 1, 2)
        loss, _, _ = strategy.forward_backward(batch, None, LR)
        out[f"loss_{mode}"] = float(loss)
        grads[mode] = {n: p.grad.clone() for n, p in strategy.model.named_parameters()}
    model = build_model(cfg.model, params_dtype=torch.float32, seed=cfg.train.seed)
    total = 0.0
    for tokens, offset in zip(batch.tokens, batch.offsets):
        state = None
        for lo in range(0, 32, 8):
            o = model(tokens[:, lo:lo + 8], labels=tokens[:, lo + 1:lo + 9], state=state, position_offset=offset,
                      return_logits=False)
            (o.loss / 4 / 2).backward()
            total += float(o.loss) / 8
            state = o.state.detach()
    out["loss_detached"] = total
    stop_groups()

    def worst(a, b):
        return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)) for n in b)

    detached = {n: p.grad for n, p in model.named_parameters()}
    out["truncated_vs_detached"] = worst(grads["truncated"], detached)
    out["truncated_vs_exact"] = worst(grads["truncated"], grads["exact"])
    return out


@pytest.mark.parametrize("changes, keys", [
    ({"train.micro_chunk_len": 12}, ["train.micro_chunk_len", "model.block_size"]),
    ({"train.micro_chunk_mode": "exact", "parallel.pipeline_parallel_size": 2},
     ["train.micro_chunk_mode", "parallel.pipeline_parallel_size"]),
    ({"model.attention": "dense"}, ["train.micro_chunk_len", "model.attention"]),
    ({"parallel.zero_stage": 2}, ["train.micro_chunk_len", "parallel.zero_stage"]),
    ({"train.micro_chunk_mode": "truncated", "parallel.pipeline_parallel_size": 2, "data.seq_len": 36},
     ["data.seq_len", "train.micro_chunk_len"]),
    ({"train.micro_chunk_mode": "sliced"}, ["train.micro_chunk_mode"]),
    ({"train.micro_chunk_mode": "truncated", "train.micro_chunk_offload_states": True},
     ["train.micro_chunk_offload_states", "train.micro_chunk_mode"]),
])
def test_validate_refuses_micro_chunk_settings_naming_the_keys(changes, keys):
    from pipeline.config.rules import validate

    cfg = _config(seq=32, chunk=8)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    with pytest.raises(ValueError) as error:
        validate(cfg, world_size=2)
    for key in keys:
        assert key in str(error.value), (key, str(error.value))
