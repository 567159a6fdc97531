"""`python -m pipeline.evaluate passkey|position-loss` on a checkpoint trained by pipeline.train
(through load_whole_model, with the run's tokenizer): each writes its JSON and picture and prints
its table; a checkpoint of another architecture and an unknown tokenizer end in one stderr line."""

from __future__ import annotations

import json

import pytest

from tests.trained_checkpoints import copy_step, edit_model_config, one_line_error, run_cases, run_command, train_tiny

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    return train_tiny(shards, tmp_path_factory.mktemp("eval_cli") / "run")


def test_passkey_cli_runs_on_a_trained_checkpoint(trained, tmp_path):
    result = run_command("pipeline.evaluate", "passkey", "--checkpoint", trained, "--lengths", "260", "300", "--depths",
                         "0", "1", "--trials", "2", "--chunk-tokens", "32", "--device", "cpu", "--output", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert [(c["length"], c["depth"]) for c in saved["cells"]] == [(260, 0.0), (260, 1.0), (300, 0.0), (300, 1.0)]
    assert saved["tokenizer"] == "byte" and saved["model"]["num_layers"] == 2  # the run's tokenizer and model
    assert all(len(c["examples"]) == 2 and 0 <= c["accuracy"] <= 1 for c in saved["cells"])
    assert (tmp_path / "passkey_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    assert sum(line.startswith("length") and "accuracy" in line for line in result.stdout.splitlines()) == 4


def test_position_loss_cli_runs_on_a_trained_checkpoint(trained, shards, tmp_path):
    result = run_command("pipeline.evaluate", "position-loss", "--checkpoint", trained.parent, "--data",
                         shards / "valid" / "manifest.json", "--length", "128", "--buckets", "4", "--sequences", "2",
                         "--batch", "2", "--chunk-tokens", "32", "--device", "cpu", "--output", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "position_loss.json").read_text())
    assert saved["sequences"] == 2 and saved["buckets"][-1]["end"] == 128
    assert all(0 < b["loss"] < 10 for b in saved["buckets"])  # nats of a byte model near ln 256 = 5.5
    assert (tmp_path / "position_loss.png").read_bytes()[:8] == PNG_MAGIC
    assert sum(line.startswith("positions") for line in result.stdout.splitlines()) == len(saved["buckets"])


def test_evaluate_bad_checkpoint_or_tokenizer_is_one_line(trained, tmp_path, capsys):
    other = copy_step(trained, tmp_path / "other" / trained.name)
    edit_model_config(other, num_layers=3)
    common = ["--lengths", "260", "--trials", "1", "--device", "cpu", "--output", tmp_path / "out"]
    cases = [
        (["--checkpoint", other], "its weights are not the model its config.yaml describes (another architecture?)"),
        (["--checkpoint", trained, "--tokenizer", "bpe-32k"],
         "tokenizer 'bpe-32k' is neither 'byte' nor an existing file"),
    ]
    results = run_cases([("pipeline.evaluate", ["passkey", *argv, *common]) for argv, _ in cases], capsys)
    for (_, message), result in zip(cases, results):
        assert message in one_line_error(result, "pipeline.evaluate")
    assert not (tmp_path / "out").exists()
