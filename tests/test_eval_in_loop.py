"""Evaluation inside the training loop (pipeline/evaluation/in_loop.py, the `eval` config section) with
the real model, real shards (tests/conftest.py) and a real MLflow store (SQLite): metrics and pictures
reach MLflow at the evaluated steps, a resume neither repeats nor loses an evaluation (also one skipped
at a stop), evaluating leaves the training unchanged, and bad settings get one clear error each."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpointing.files import load_file
from pipeline.config.load import load_config
from pipeline.config.rules import validate
from pipeline.train import main, run
from tests.conftest import tiny_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_FILES = {"passkey.json", "passkey_heatmap.png", "position_loss.json", "position_loss.png"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def eval_overrides(shards: Path, run_dir: Path, uri: str, **extra) -> list[str]:
    """tiny_overrides plus an evaluation every 2 steps: PassKey at 256 and 320 tokens, key first and
    last, 2 keys each; loss by position over 2 held-out sequences of 200 tokens; MLflow at `uri`."""
    values = dict(
        eval__enabled=True, eval__interval_steps=2, eval__passkey_lengths="[256,320]", eval__passkey_depths="[0,1]",
        eval__passkey_trials=2, eval__passkey_batch_size=2, eval__chunk_tokens=32, eval__position_loss_length=200,
        eval__position_loss_manifest=shards / "valid" / "manifest.json", eval__position_loss_sequences=2,
        eval__position_loss_buckets=5, tracking__enabled=True, tracking__tracking_uri=uri, train__steps=4,
        train__eval_interval_steps=4,
    )
    values.update(extra)
    return tiny_overrides(shards, run_dir, **values)


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def eval_state(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}", "trainer.pt")["eval"]


def test_in_loop_evaluation_reaches_mlflow_and_survives_a_resume(shards, tmp_path):
    """Steps 1-3, then a resume to 4: evaluations at 2 and 4, each once; the evaluated step 2
    checkpoints although checkpoint.save_interval_steps is 3; the training is the same as without."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    first = run(load_config(None, eval_overrides(shards, run_dir, uri, train__exit_after_steps=3)))
    assert first["status"] == "KILLED" and first["step"] == 3
    assert eval_state(run_dir, 2) == {"last_step": 2} and eval_state(run_dir, 3) == {"last_step": 2}
    second = run(load_config(None, eval_overrides(shards, run_dir, uri)))
    assert second["status"] == "FINISHED" and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert eval_state(run_dir, 4) == {"last_step": 4}

    client, run_id = MlflowClient(uri), second["mlflow_run_id"]
    for key in ("passkey/acc", "passkey/digits", "passkey/acc_L256", "passkey/acc_L320_d100", "position_loss/0-1",
                "position_loss/53-200"):
        assert metric_steps(client, run_id, key) == [2, 4], key
    for step in (2, 4):
        folder = f"eval/step_{step:08d}"
        assert {Path(a.path).name for a in client.list_artifacts(run_id, folder)} == EVAL_FILES
        assert {p.name for p in (run_dir / folder).iterdir()} == EVAL_FILES
        for picture in ("passkey_heatmap.png", "position_loss.png"):
            local = Path(client.download_artifacts(run_id, f"{folder}/{picture}", str(tmp_path / f"dl{step}")))
            assert local.read_bytes()[:8] == PNG_MAGIC and local.stat().st_size > 5000

    plain = run(load_config(None, tiny_overrides(shards, tmp_path / "plain", train__steps=4,
                                                 train__eval_interval_steps=4)))
    assert first["losses"] + second["losses"] == plain["losses"]  # bitwise: evaluation draws no RNG, changes nothing


def test_an_evaluation_skipped_at_a_stop_runs_first_on_resume(shards, tmp_path):
    """train.max_wall_seconds stops the run after step 1, where an evaluation is due: it is skipped
    (the stop stays fast) and owed in the checkpoint; the resumed run evaluates step 1 before training
    on, records it, and goes on to step 2. With eval.at_stop the stop step itself is evaluated."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    stopped = run(load_config(None, eval_overrides(shards, run_dir, uri, eval__interval_steps=1, train__steps=2,
                                                   train__max_wall_seconds=0.001)))
    assert stopped["status"] == "KILLED" and stopped["step"] == 1
    assert eval_state(run_dir, 1) == {"last_step": -1} and not (run_dir / "eval").exists()
    resumed = run(load_config(None, eval_overrides(shards, run_dir, uri, eval__interval_steps=1, train__steps=2)))
    assert resumed["status"] == "FINISHED" and resumed["mlflow_run_id"] == stopped["mlflow_run_id"]
    assert eval_state(run_dir, 1) == {"last_step": 1}  # the owed evaluation, recorded in step 1's checkpoint
    client = MlflowClient(uri)
    assert metric_steps(client, resumed["mlflow_run_id"], "passkey/acc") == [1, 2]
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step_00000001", "step_00000002"]

    at_stop = run(load_config(None, eval_overrides(shards, tmp_path / "at_stop", uri, eval__interval_steps=5,
                                                   train__steps=6, eval__at_stop=True, train__max_wall_seconds=0.001)))
    assert at_stop["status"] == "KILLED" and at_stop["step"] == 1
    assert metric_steps(client, at_stop["mlflow_run_id"], "passkey/acc") == [1]
    assert eval_state(tmp_path / "at_stop", 1) == {"last_step": 1}


BAD_SETTINGS = [
    (dict(parallel__tensor_parallel_size=2), "eval.enabled=true with parallel.tensor_parallel_size=2 .* TP/PP ranks "
                                             "hold only shards .* python -m pipeline.evaluate"),
    (dict(parallel__zero_stage=3), "eval.enabled=true with parallel.zero_stage=3: ZeRO-3 partitions the weights"),
    (dict(eval__passkey_lengths="[]", eval__position_loss_manifest=None), "nothing to evaluate"),
    (dict(eval__passkey_depths="[0,1.2]"), r"eval.passkey_depths=\[0.0, 1.2\]: give fractions in \[0, 1\]"),
    (dict(eval__chunk_tokens=24), "eval.chunk_tokens=24: must be a multiple of model.block_size=16"),
    (dict(eval__passkey_trials=0), "eval.passkey_trials=0: must be >= 1"),
    (dict(eval__interval_steps=-1), "eval.interval_steps=-1: must be >= 0"),
    (dict(eval__max_tokens=2000), r"one evaluation would stream 2,704 tokens .* over eval.max_tokens=2,000"),
]


@pytest.mark.parametrize("extra,message", BAD_SETTINGS, ids=[m.split(":")[0][:40] for _, m in BAD_SETTINGS])
def test_bad_eval_settings_are_refused_by_validate(extra, message, shards, tmp_path):
    cfg = load_config(None, eval_overrides(shards, tmp_path, "sqlite:///unused.db", **extra))
    with pytest.raises(ValueError, match=message):
        validate(cfg, world_size=2)


def test_a_passkey_length_below_the_fixed_part_stops_before_the_first_step(shards, tmp_path, capsys):
    """Checked when the evaluator is built: a step would checkpoint (save_interval_steps=1) and write
    run outputs before the first evaluation."""
    args = eval_overrides(shards, tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}",
                          eval__passkey_lengths="[256,100]", tracking__enabled=False, checkpoint__save_interval_steps=1)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m pipeline.train: error: passkey length 100 is below the prompt's fixed part")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "summary.json").exists()
    args = eval_overrides(shards, tmp_path / "run2", "unused", eval__tokenizer="nope.model", tracking__enabled=False)
    assert main(args) == 2
    assert "tokenizer 'nope.model' is neither 'byte' nor an existing file" in capsys.readouterr().err
