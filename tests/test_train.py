"""The training entry point with the real model and real shards (tests/conftest.py `shards`):
loss falls, a resumed run reproduces the uninterrupted one bitwise, 2-process data parallel
equals one process with the same global batch, RPO/RSP draws and their use in training."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpointing.files import MANIFEST, list_checkpoints, load_file, verify_checkpoint
from pipeline.config.load import load_config
from pipeline.parallel.groups import ProcessGroups
from pipeline.train import main, run
from pipeline.training.draws import draw_step, micro_batch_offsets
from tests.conftest import ROOT, tiny_overrides
from tests.spawn import run_on_ranks
from tests.time_bounds import HANG_GUARD_SECONDS


def _run(shards, run_dir, **extra) -> dict:
    return run(load_config(None, tiny_overrides(shards, run_dir, **extra)))


def _final_params(checkpoint: str) -> dict[str, torch.Tensor]:
    """The tensors of the final model shard (megatron adds `_extra_state` entries that are None)."""
    state = load_file(checkpoint, "model_tp00.pt")["model"]
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def test_training_lowers_the_loss_and_writes_run_outputs(shards, tmp_path):
    summary = _run(shards, tmp_path / "run", train__steps=24, optim__lr=1e-2, train__eval_interval_steps=12,
                   checkpoint__save_interval_steps=6)
    assert summary["status"] == "FINISHED" and summary["step"] == 24
    assert summary["final_loss"] < 0.7 * summary["first_loss"], summary["losses"]
    assert [s for s, _ in summary["val_losses"]] == [12, 24] and summary["final_val_loss"] < 0.7 * 5.55
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [18, 24]  # keep_last=2
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000024"
    names = set(json.loads((ckpt / MANIFEST).read_text())["files"])
    assert names == {"model_tp00.pt", "optim_tp00.pt", "loader_dp000.pt", "rng_r00000.pt", "trainer.pt", "config.yaml"}
    assert "num_layers: 2" in (ckpt / "config.yaml").read_text()
    for name in ("config.yaml", "summary.json", "loss_curve.png"):
        assert (tmp_path / "run" / name).is_file()


def test_resumed_run_reproduces_the_uninterrupted_losses_bitwise(shards, tmp_path):
    """Step 3 stops with a checkpoint; the second invocation resumes (resume=auto). Model,
    AdamW state, loader position, RNG and RSP state are restored, and RPO/RSP draws depend on
    (seed, step) only, so on CPU the losses and weights must be identical, not just close."""
    straight = _run(shards, tmp_path / "straight")
    first = _run(shards, tmp_path / "split", train__exit_after_steps=3)
    assert first["status"] == "KILLED" and first["step"] == 3 and first["last_checkpoint"].endswith("step_00000003")
    second = _run(shards, tmp_path / "split")
    assert second["step"] == 6
    assert first["losses"] + second["losses"] == straight["losses"]
    assert second["val_losses"] == straight["val_losses"][-1:]
    resumed = _final_params(second["last_checkpoint"])
    for name, value in _final_params(straight["last_checkpoint"]).items():
        assert torch.equal(value, resumed[name]), name


def _dp_worker(rank: int, world_size: int, shards: str, run_dir: str) -> dict:
    torch.set_num_threads(1)
    summary = _run(Path(shards), Path(run_dir))
    return {"losses": summary["losses"], "val_losses": summary["val_losses"], "checkpoint": summary["last_checkpoint"]}


def test_dp2_matches_one_process_with_the_same_global_batch(shards, tmp_path):
    """Global batch 4: one process accumulates 2 micro-batches of 2; two processes take one
    micro-batch of 2 each and average gradients. The samples, RPO offsets and RSP state are the
    same; only the fp32 summation order of the gradients differs (autograd accumulation vs an
    all-reduce), ~1e-7 relative per step. AdamW divides by sqrt(v), which can amplify that a
    little over 6 steps, so losses agree to 1e-5 relative and weights to 1e-5 absolute."""
    reference = _run(shards, tmp_path / "one")
    results = run_on_ranks(_dp_worker, 2, str(shards), str(tmp_path / "two"))
    assert results[0]["losses"] == results[1]["losses"]  # every rank logs the DP-averaged loss
    ref_losses = [loss for _, loss in reference["losses"]]
    dp_losses = [loss for _, loss in results[0]["losses"]]
    np.testing.assert_allclose(dp_losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose([v for _, v in results[0]["val_losses"]], [v for _, v in reference["val_losses"]], rtol=1e-5)
    dp_params = _final_params(results[0]["checkpoint"])
    for name, value in _final_params(reference["last_checkpoint"]).items():
        torch.testing.assert_close(dp_params[name], value, rtol=0, atol=1e-5, msg=name)
    names = set(json.loads((tmp_path / "two" / "checkpoints" / "step_00000006" / MANIFEST).read_text())["files"])
    assert {"loader_dp000.pt", "loader_dp001.pt", "rng_r00000.pt", "rng_r00001.pt", "model_tp00.pt"} <= names

    # A checkpoint of 2 processes does not silently load into 1.
    with pytest.raises(ValueError, match="written by world=2 TP=1 PP=1 DP=2"):
        _run(shards, tmp_path / "two", train__steps=8, optim__warmup_steps=2)


# ---------------------------------------------------------------- RPO and RSP


def test_rpo_offsets_are_zero_half_the_time_within_range_and_reproducible():
    draws = [draw_step(1234, step, 8, 10000.0, True, 0.8) for step in range(500)]
    offsets = torch.cat([d.offsets for d in draws])
    zero = (offsets == 0).float().mean().item()
    assert 0.45 < zero < 0.55  # 4000 draws: 5 standard deviations is 0.04
    assert offsets.min() >= 0 and offsets.max() < 2 * np.pi * 10000.0
    assert offsets[offsets > 0].mean() == pytest.approx(np.pi * 10000.0, rel=0.05)  # uniform over the range
    assert torch.equal(draw_step(1234, 7, 8, 1e4, True, 0.8).offsets, draws[7].offsets)
    assert not torch.equal(draw_step(1235, 7, 8, 1e4, True, 0.8).offsets, draws[7].offsets)
    assert torch.count_nonzero(draw_step(1234, 7, 8, 1e4, False, 0.8).offsets) == 0


def test_rsp_coin_follows_the_probability():
    for p in (0.0, 0.3, 0.8, 1.0):
        used = np.mean([draw_step(0, step, 2, 1e4, True, p).use_saved_fam for step in range(2000)])
        assert used == pytest.approx(p, abs=0.04)  # 2000 coins: 4 standard deviations at p = 0.5


def test_each_sample_gets_its_global_batch_offset_under_dp():
    draws = draw_step(0, 3, 8, 1e4, True, 0.8)
    one = torch.cat([micro_batch_offsets(draws, a, ProcessGroups(), 2) for a in range(4)])
    two = [micro_batch_offsets(draws, a, ProcessGroups(dp_rank=r, dp_size=2), 2) for a in range(2) for r in range(2)]
    assert torch.equal(one, torch.cat(two)) and torch.equal(one, draws.offsets)


@pytest.mark.parametrize("probability, expected", [(0.0, 0), (1.0, 5)])
def test_rsp_starts_from_the_saved_fam_only_when_the_coin_says_so(shards, tmp_path, probability, expected):
    """p=0 never passes state; p=1 passes the previous step's FAM on every step but the first."""
    summary = _run(shards, tmp_path / "rsp", train__rsp_probability=probability, train__eval_interval_steps=0,
                   checkpoint__save_interval_steps=0)
    assert summary["rsp_steps"] == expected


# ---------------------------------------------------------------- command line


def _error_line(capsys) -> str:
    """The command's error, which must be one line, the last on stderr, without a traceback
    (third-party warnings printed earlier, e.g. megatron's at model build, are not ours)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines), lines
    assert [line for line in lines if " error: " in line] == lines[-1:], lines
    return lines[-1]


def test_cli_rejects_bad_input_in_one_line(shards, tmp_path, capsys):
    assert main(["--config", "tiny", "--train.stepz=3"]) == 2
    assert "python -m pipeline.train: error: unknown key(s) ['stepz'] in `train`" in _error_line(capsys)
    assert main(tiny_overrides(shards, tmp_path / "r", data__train_manifest=tmp_path / "nope.json")) == 2
    assert "nope.json: no such file. Build shards first" in _error_line(capsys)
    assert main(tiny_overrides(shards, tmp_path / "r", data__global_batch_size=3)) == 2
    assert "data.global_batch_size=3 must be a positive multiple" in _error_line(capsys)
    assert main(tiny_overrides(shards, tmp_path / "r", model__vocab_size=128)) == 2
    assert "holds token ids up to 255 but model.vocab_size=128" in _error_line(capsys)
    assert not (tmp_path / "r").exists()  # all of them before any work


def test_shard_seq_len_mismatch_is_one_line_before_any_work_and_debug_shows_the_traceback(shards, tmp_path):
    """Through the real command (`python -m pipeline.train`, data_prep/cli.py run_main)."""
    args = tiny_overrides(shards, tmp_path / "r", data__seq_len=32)
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    manifest = shards / "train" / "manifest.json"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"python -m pipeline.train: error: data.train_manifest={manifest} was sharded with seq_len=64 but "
        "data.seq_len=32; set data.seq_len=64, or re-shard with --seq-len 32")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="was sharded with seq_len=64"):
        main([*args, "--debug"])


def test_explicit_resume_of_a_corrupt_checkpoint_is_one_line(shards, tmp_path, capsys):
    summary = _run(shards, tmp_path / "r", train__steps=3, train__eval_interval_steps=0)
    model_file = Path(summary["last_checkpoint"]) / "model_tp00.pt"
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"corrupted!")
    capsys.readouterr()
    args = tiny_overrides(shards, tmp_path / "r", checkpoint__resume=summary["last_checkpoint"])
    assert main(args) == 2
    assert _error_line(capsys) == (f"python -m pipeline.train: error: checkpoint.resume={summary['last_checkpoint']}: "
                                   f"model_tp00.pt does not match its sha256 in manifest.json (corrupt)")
    with pytest.raises(ValueError, match="model_tp00.pt does not match its sha256"):
        main([*args, "--debug"])


def test_resume_none_refuses_to_mix_with_existing_checkpoints(shards, tmp_path):
    _run(shards, tmp_path / "r", train__steps=3, train__eval_interval_steps=0)
    with pytest.raises(ValueError, match="checkpoint.resume=none but checkpoint.dir=.* already holds step_00000003"):
        _run(shards, tmp_path / "r", checkpoint__resume="none")


def _tp_worker(rank: int, world_size: int, shards: str, run_dir: str) -> dict:
    torch.set_num_threads(1)
    summary = _run(Path(shards), Path(run_dir), parallel__tensor_parallel_size=2, optim__grad_clip=0.5)
    return {"losses": summary["losses"], "grad_norms": summary["grad_norms"]}


def test_tp2_matches_tp1_loss_and_grad_norm_with_clipping(shards, tmp_path):
    """grad_clip=0.5 clips every step here (norms are ~1), so a wrong TP norm (a shard's norm,
    or replicated norms counted twice) changes the update. TP=2 splits matmuls and the
    vocabulary softmax, reordering fp32 sums (~1e-7 relative); 1e-5 over 6 steps allows for
    AdamW amplifying that and is far below the ~1e-2 a wrong clip coefficient causes."""
    reference = _run(shards, tmp_path / "tp1", optim__grad_clip=0.5)
    results = run_on_ranks(_tp_worker, 2, str(shards), str(tmp_path / "tp2"))
    np.testing.assert_allclose([v for _, v in results[0]["losses"]], [v for _, v in reference["losses"]], rtol=1e-5)
    # The pre-clip norm of the full model: sharded squares summed over TP, replicated ones once.
    np.testing.assert_allclose([v for _, v in results[0]["grad_norms"]], [v for _, v in reference["grad_norms"]], rtol=1e-5)
    assert all(v > 0.5 for _, v in reference["grad_norms"])  # so clipping was active on every step


def test_sigterm_finishes_the_step_saves_a_checkpoint_sends_the_metrics_and_exits_0(shards, tmp_path):
    """What Slurm does before a time limit: SIGTERM. The run must leave a complete checkpoint, and
    MLflow every step's metrics although the flush interval was never reached."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = tiny_overrides(shards, tmp_path / "run", train__steps=100000, optim__warmup_steps=10,
                          train__eval_interval_steps=0, checkpoint__save_interval_steps=0, tracking__enabled=True,
                          tracking__tracking_uri=uri, tracking__flush_interval_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + HANG_GUARD_SECONDS
        while not any("step 3/100000" in line for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_GUARD_SECONDS) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "KILLED" and 3 <= summary["step"] < 100000
    assert summary["last_checkpoint"].endswith(f"step_{summary['step']:08d}")
    assert verify_checkpoint(summary["last_checkpoint"]) is None
    assert any("signal 15: stopping after this step" in line for line in lines)
    history = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, summary["step"] + 1))


def test_training_on_a_blend_mixes_manifests_in_proportion_and_resumes_exactly(shards, tmp_path):
    """data.train_blend: two manifests (here the train and valid splits of the same shards, so
    sample keys say which source each came from) at 0.75 / 0.25; the run logs the realised mix,
    and a resumed blended run reproduces the uninterrupted one bitwise."""
    blend = [shards / "train" / "manifest.json", shards / "valid" / "manifest.json"]
    extra = dict(data__train_blend=f"[{blend[0]}, {blend[1]}]", data__train_blend_weights="[0.75, 0.25]",
                 train__steps=8, train__record_sample_keys=str(tmp_path / "keys"))
    straight = _run(shards, tmp_path / "straight", **extra)
    keys = [json.loads(line)["keys"] for line in (tmp_path / "keys" / "keys_r00000.jsonl").read_text().splitlines()]
    sources = [k.split(":", 1)[0] for step in keys for k in step]
    assert len(sources) == 8 * 4 and abs(sources.count("0") / len(sources) - 0.75) <= 0.05

    extra["train__record_sample_keys"] = str(tmp_path / "keys_split")
    _run(shards, tmp_path / "split", train__exit_after_steps=4, **extra)
    resumed = _run(shards, tmp_path / "split", **extra)
    assert [loss for _, loss in resumed["losses"]] == [loss for _, loss in straight["losses"]][-len(resumed["losses"]):]
    assert resumed["final_loss"] == straight["final_loss"]


def test_blend_needs_one_weight_per_manifest(shards, tmp_path):
    from pipeline.config.rules import validate

    cfg = load_config(None, tiny_overrides(shards, tmp_path, data__train_blend="[a.json, b.json]",
                                           data__train_blend_weights="[1.0]"))
    with pytest.raises(ValueError, match=r"data.train_blend has 2 manifests but data.train_blend_weights=\[1.0\]"):
        validate(cfg, 1)
