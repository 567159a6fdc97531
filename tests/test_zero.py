"""DeepSpeed ZeRO on megatron's groups equals one process: the loss of every step and the final
parameters over 3 AdamW steps with gradient clipping, for DP=2 with ZeRO-1/2/3, TP=2 x DP=2 with
ZeRO-2 and PP=2 x DP=2 with ZeRO-1; a DP=2 checkpoint resumes at DP=1 and consolidates into a
plain state dict. Its configuration checks are in tests/test_zero_config.py.

The one-process reference is build_model + torch AdamW (pipeline/training/optim.py's groups) + TP-aware
clipping, which in one process is torch.nn.utils.clip_grad_norm_ on the full parameters. Each
spawn runs several checks (DeepSpeed's first initialize JIT-builds a comm op, cached in
TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions by default).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.spawn import run_on_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned workers

GLOBAL_BATCH, SEQ, MICRO, STEPS = 8, 20, 2, 3  # a partial last block (block_size 8)
GRAD_CLIP = 0.5  # below the tiny model's gradient norm (0.67-0.76), so clipping acts on every step
OPTIM = dict(lr=1e-2, min_lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-6, grad_clip=GRAD_CLIP)
# fp32 throughout. Data parallelism, TP, PP and ZeRO change only the order of reductions (DP sums,
# row-parallel all-reduces, partitioned norms): losses agree to 1e-5, gradients (checked through
# the pre-clip norm) to 1e-6 relative. Parameters: Adam moves each weight by at most ~lr per step
# (3e-2 over 3 steps), but divides by |g| + eps, so at entries whose gradient is near zero it
# amplifies rounding noise by up to lr / eps = 1e4: 1e-9 of noise -> 1e-5. In one process,
# micro-batching the same batch alone moves layers.0.mlp.linear_fc1 by 1.7e-6 (eps=1e-6) and by
# 4e-5 (eps=1e-8, hence eps=1e-6 here). So parameters agree to 3e-5 absolute: 1e-3 of the movement.
LOSS_TOL, PARAM_ATOL = 1e-5, 3e-5


def _args():
    from tests.test_reference import small_args

    return small_args(num_layers=4)


def _optim_cfg():
    from pipeline.config.tree import OptimConfig

    return OptimConfig(**OPTIM)


def _batch(step: int, vocab: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=g)
    offsets = torch.rand(GLOBAL_BATCH, generator=g) * 500.0
    return tokens, labels, offsets


def _rows(a: int, dp_rank: int, dp: int, micro: int) -> slice:
    """Rows of accumulation step a on dp_rank (pipeline/training/draws.py's global batch index)."""
    start = (a * dp + dp_rank) * micro
    return slice(start, start + micro)


def _full_weights(args):
    from model.reference import ReferenceFAM
    from model.weights import megatron_state_from_reference

    torch.manual_seed(0)
    return megatron_state_from_reference(ReferenceFAM(args), args)


def _reference(steps: int) -> dict:
    """One process, the whole global batch each step."""
    from model import build_model
    from pipeline.training.optim import build_optimizer

    args = _args()
    model = build_model(args)
    model.load_state_dict(_full_weights(args))
    optimizer = build_optimizer(model, _optim_cfg())
    losses, norms = [], []
    for step in range(steps):
        tokens, labels, offsets = _batch(step, args.vocab_size)
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels, position_offset=offsets).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)))
        optimizer.step()
        losses.append(loss.item())
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    return {"losses": losses, "norms": norms, "params": params}


def _reference_worker(rank, world_size, steps):
    return _reference(steps)


@pytest.fixture(scope="module")
def reference():
    """STEPS steps, plus one more for the resume check."""
    ref = run_on_ranks(_reference_worker, 1, STEPS + 1)[0]
    short = run_on_ranks(_reference_worker, 1, STEPS)[0]
    return {"losses": ref["losses"], "norms": ref["norms"], "params": short["params"], "params_after_4": ref["params"]}


# ---------------------------------------------------------------- distributed workers


def _setup(tp: int, pp: int):
    from pipeline.parallel.groups import start_groups

    return start_groups(tensor_parallel_size=tp, pipeline_parallel_size=pp)


def _teardown():
    from pipeline.parallel.groups import stop_groups

    stop_groups()


def _ds_config(stage: int, dp: int, pp: int = 1) -> dict:
    """The DeepSpeed JSON of GLOBAL_BATCH rows per step in micro-batches of MICRO, fp32, clip GRAD_CLIP."""
    from pipeline.config.load import load_config
    from pipeline.parallel.zero_config import to_deepspeed_config

    cfg = load_config(None, [f"--parallel.zero_stage={stage}", f"--parallel.pipeline_parallel_size={pp}",
                             f"--data.micro_batch_size={MICRO}", f"--data.global_batch_size={GLOBAL_BATCH}",
                             f"--optim.grad_clip={GRAD_CLIP}"])
    return to_deepspeed_config(cfg, dp, bf16=False)


def _build_engine(ranks, stage: int, args, load_weights: bool = True):
    from model import build_model
    from model.weights import shard_megatron_state
    from pipeline.parallel.mpu import MegatronMPU
    from pipeline.parallel.zero import ZeroModule, build_zero_engine
    from pipeline.training.optim import build_optimizer

    model = build_model(args, tp_group=ranks.tp_group)
    if load_weights:
        model.load_state_dict(shard_megatron_state(_full_weights(args), ranks.tp_rank, ranks.tp_size))
    module = ZeroModule(model)
    return build_zero_engine(module, build_optimizer(module, _optim_cfg()), _ds_config(stage, ranks.dp_size),
                             MegatronMPU.from_groups(ranks))


def _train(engine, ranks, args, steps: range) -> list[float]:
    """Losses (DP mean) of `steps`; each rank takes its rows of the global batch."""
    from pipeline.parallel.collectives import all_reduce_mean
    from pipeline.parallel.zero import zero_train_step

    accum = GLOBAL_BATCH // (MICRO * ranks.dp_size)
    losses = []
    for step in steps:
        tokens, labels, offsets = _batch(step, args.vocab_size)
        micro = [_rows(a, ranks.dp_rank, ranks.dp_size, MICRO) for a in range(accum)]
        batches = [dict(tokens=tokens[r], labels=labels[r], position_offset=offsets[r]) for r in micro]
        result = zero_train_step(engine, batches)
        losses.append(float(all_reduce_mean(result.loss, ranks.dp_group)))
    return losses


def _gather_full_params(engine, ranks, pp_group=None) -> dict[str, np.ndarray] | None:
    """Full fp32 parameters at TP=1 naming, on global rank 0 (collective)."""
    import torch.distributed as dist

    from model.weights import merge_megatron_shards
    from pipeline.parallel.zero import full_fp32_state_dict

    local = full_fp32_state_dict(engine)
    shards = [None] * ranks.tp_size
    dist.all_gather_object(shards, local, group=ranks.tp_group)
    merged = {k: v.numpy() for k, v in merge_megatron_shards(shards).items()}
    if pp_group is not None:
        parts = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(parts, merged, group=pp_group)
        merged = {k: v for part in parts for k, v in part.items()}
    return merged if ranks.rank == 0 else None


def _zero_worker(rank, world_size, tp, stages, ckpt_root):
    """ZeRO stages one after another in the same processes; each saves a checkpoint if asked."""
    from pipeline.checkpointing.zero_files import save_zero_checkpoint

    ranks = _setup(tp, 1)
    args = _args()
    out = {}
    for stage in stages:
        engine = _build_engine(ranks, stage, args)
        losses = _train(engine, ranks, args, range(STEPS))
        norm = engine.get_global_grad_norm()
        params = _gather_full_params(engine, ranks)
        if ckpt_root:
            save_zero_checkpoint(engine, ckpt_root, f"zero{stage}", client_state={"step": STEPS})
        out[stage] = {"losses": losses, "params": params, "last_norm": None if norm is None else float(norm)}
        engine.destroy()
    _teardown()
    return out if rank == 0 else None


def _pp_worker(rank, world_size):
    """PP=2 x DP=2 with ZeRO-1: the 1F1B schedule runs each DP rank's 4 rows as 2 micro-batches."""
    from model.weights import shard_megatron_state
    from pipeline.parallel.collectives import all_reduce_mean
    from pipeline.parallel.mpu import MegatronMPU
    from pipeline.parallel.stages import build_schedule, build_stages, load_stage_state_dict
    from pipeline.parallel.zero import ZeroModule, build_zero_engine, zero_pipeline_step
    from pipeline.training.optim import build_optimizer

    pp = 2
    ranks = _setup(1, pp)
    args = _args()
    cpu = torch.device("cpu")
    stages = build_stages(args, ranks.pp_rank, pp, device=cpu, tp_group=ranks.tp_group)
    load_stage_state_dict(stages, shard_megatron_state(_full_weights(args), ranks.tp_rank, ranks.tp_size))
    accum = GLOBAL_BATCH // (MICRO * ranks.dp_size)
    schedule = build_schedule(stages, pp, accum, "1f1b", ranks.pp_group, cpu)
    module = ZeroModule(stages=stages)
    engine = build_zero_engine(module, build_optimizer(module, _optim_cfg()), _ds_config(1, ranks.dp_size, pp),
                               MegatronMPU.from_groups(ranks))
    pp_group = ranks.pp_group
    losses = []
    for step in range(STEPS):
        tokens, labels, offsets = _batch(step, args.vocab_size)
        rows = torch.cat([torch.arange(GLOBAL_BATCH)[_rows(a, ranks.dp_rank, ranks.dp_size, MICRO)] for a in range(accum)])
        loss = zero_pipeline_step(engine, schedule, stages, tokens[rows], labels[rows], offsets[rows])
        loss = None if loss is None else float(all_reduce_mean(loss, ranks.dp_group))
        per_stage = [None] * pp
        torch.distributed.all_gather_object(per_stage, loss, group=pp_group)
        losses.append(next(x for x in per_stage if x is not None))
    norm = float(engine.get_global_grad_norm())
    params = _gather_full_params(engine, ranks, pp_group)
    _teardown()
    return {"losses": losses, "params": params, "last_norm": norm} if rank == 0 else None


def _resume_worker(rank, world_size, ckpt_root, consolidated):
    """DP=1: resume the DP=2 ZeRO-1/2 checkpoints (optimizer state re-partitioned) for one more
    step; a ZeRO-3 checkpoint refuses the DP change. Then the next step's loss of the plain model
    loaded (strictly) from each consolidated state dict: the weights-only resume."""
    from model import build_model
    from pipeline.checkpointing.zero_files import load_zero_checkpoint

    ranks = _setup(1, 1)
    args = _args()
    out = {"consolidated_loss": {}}
    tokens, labels, offsets = _batch(STEPS, args.vocab_size)
    for stage, state_dict in consolidated.items():
        model = build_model(args, tp_group=ranks.tp_group)
        model.load_state_dict(state_dict)  # strict: the plain model's every key
        with torch.no_grad():
            out["consolidated_loss"][stage] = model(tokens, labels=labels, position_offset=offsets).loss.item()
    for stage in (1, 2, 3):
        engine = _build_engine(ranks, stage, args, load_weights=False)
        if stage == 3:
            try:
                load_zero_checkpoint(engine, ckpt_root, "zero3")
                out[3] = "loaded"
            except ValueError as err:
                out[3] = str(err)
        else:
            client = load_zero_checkpoint(engine, ckpt_root, f"zero{stage}")
            losses = _train(engine, ranks, args, range(client["step"], client["step"] + 1))
            out[stage] = {"losses": losses, "params": _gather_full_params(engine, ranks)}
        engine.destroy()
    _teardown()
    return out


def _assert_matches(got: dict, ref: dict, what: str, ref_params: str = "params"):
    n = len(got["losses"])
    assert np.allclose(got["losses"], ref["losses"][:n], rtol=0, atol=LOSS_TOL), (what, got["losses"], ref["losses"])
    assert got["params"].keys() == ref[ref_params].keys(), what
    for name, expected in ref[ref_params].items():
        err = abs(got["params"][name] - expected).max()
        assert err <= PARAM_ATOL, (what, name, err)


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_ckpt")
    return {"ckpt": root, "runs": run_on_ranks(_zero_worker, 2, 1, (1, 2, 3), str(root))[0]}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_dp2_zero_matches_one_process_losses_and_params(dp2, reference, stage):
    run = dp2["runs"][stage]
    _assert_matches(run, reference, f"DP=2 ZeRO-{stage}")
    # DeepSpeed's pre-clip norm of the last step is the full model's norm.
    assert run["last_norm"] == pytest.approx(reference["norms"][STEPS - 1], rel=1e-5)


def test_tp2_dp2_zero2_matches_one_process_losses_and_params(reference):
    run = run_on_ranks(_zero_worker, 4, 2, (2,), "")[0][2]
    _assert_matches(run, reference, "TP=2 x DP=2 ZeRO-2")
    # TP-aware norm: sharded weights summed over TP, replicated ones (norms, FAM prompt) once.
    assert run["last_norm"] == pytest.approx(reference["norms"][STEPS - 1], rel=1e-5)


def test_pp2_dp2_zero1_matches_one_process_losses_and_params(reference):
    run = run_on_ranks(_pp_worker, 4)[0]
    _assert_matches(run, reference, "PP=2 x DP=2 ZeRO-1")
    assert run["last_norm"] == pytest.approx(reference["norms"][STEPS - 1], rel=1e-5)


@pytest.fixture(scope="module")
def resumed(dp2, tmp_path_factory):
    from pipeline.checkpointing.zero_files import consolidate_zero_checkpoint

    out_dirs = {stage: tmp_path_factory.mktemp(f"consolidated{stage}") for stage in (1, 3)}
    consolidated = {stage: consolidate_zero_checkpoint(dp2["ckpt"], f"zero{stage}", out)[0]  # TP=1: one
                    for stage, out in out_dirs.items()}
    run = run_on_ranks(_resume_worker, 1, str(dp2["ckpt"]), consolidated)[0]
    return {"run": run, "consolidated": consolidated, "out_dirs": out_dirs}


def test_zero_checkpoint_saved_at_dp2_resumes_at_dp1(dp2, resumed, reference):
    from pipeline.checkpointing.files import verify_checkpoint

    for stage in (1, 2, 3):
        assert verify_checkpoint(dp2["ckpt"] / f"zero{stage}") is None  # manifest in checkpoint.py's format
    assert not list(dp2["ckpt"].glob(".tmp_*"))
    got = resumed["run"]
    for stage in (1, 2):  # step 4 as the uninterrupted one-process run: weights and AdamW moments restored
        ref = {"losses": reference["losses"][STEPS:], "params_after_4": reference["params_after_4"]}
        _assert_matches(got[stage], ref, f"ZeRO-{stage} DP=2 -> DP=1", "params_after_4")
    assert "dp_size" in got[3] and "consolidate_zero_checkpoint" in got[3]


@pytest.mark.parametrize("stage", [1, 3])
def test_consolidated_zero_checkpoint_loads_into_the_plain_model(resumed, reference, stage):
    assert (resumed["out_dirs"][stage] / "model_tp00.pt").is_file()
    params = {k: v.numpy() for k, v in resumed["consolidated"][stage].items() if v is not None}
    _assert_matches({"losses": [], "params": params}, reference, f"consolidated ZeRO-{stage}")
    # Weights-only resume (the ZeRO-3 / other-TP path): the next step's loss is the reference's.
    assert resumed["run"]["consolidated_loss"][stage] == pytest.approx(reference["losses"][STEPS], abs=LOSS_TOL)
