"""`python -m pipeline.export_hf` and `python -m pipeline.import_hf` on a checkpoint trained by
pipeline.train: export -> import -> export round-trips bit for bit; the imported checkpoint resumes
pipeline.train for a step whose loss is the exported weights' own loss on the loader's first batch;
bad input ends in one stderr line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config.load import load_config
from tests.conftest import SHARD_SEQ_LEN
from tests.trained_checkpoints import one_line_error, run_cases, run_command, train_tiny

SEED = 1234  # train.seed (its default): the loader's and the RPO draws' seed in the resumed run


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    return train_tiny(shards, tmp_path_factory.mktemp("hf_cli") / "run")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def data_overrides(shards: Path) -> list[str]:
    return [f"--data.train_manifest={shards / 'train' / 'manifest.json'}", f"--data.seq_len={SHARD_SEQ_LEN}",
            "--data.micro_batch_size=2", "--data.global_batch_size=4", "--train.steps=3", "--optim.warmup_steps=1",
            "--train.device=cpu", "--train.progress_bar=false", "--tracking.enabled=false"]


@pytest.fixture(scope="module")
def round_trip(trained, shards, tmp_path_factory):
    """export (trained) -> first; import first -> ckpt; export ckpt -> second: both CLIs as subprocesses,
    the second export in this process (its command ran as one already; a process costs ~9 s of imports)."""
    from pipeline.export_hf import main as export_main

    root = tmp_path_factory.mktemp("round_trip")
    for module, args in (
        ("pipeline.export_hf", ["--checkpoint", trained, "--output", root / "first"]),
        ("pipeline.import_hf", [root / "first", "--output", root / "ckpt", *data_overrides(shards)]),
    ):
        result = run_command(module, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    assert export_main(["--checkpoint", str(root / "ckpt"), "--output", str(root / "second")]) == 0
    return root


def test_export_import_export_round_trips_bit_for_bit(round_trip):
    assert (round_trip / "ckpt" / "step_00000000" / "manifest.json").is_file()
    assert (round_trip / "ckpt" / "config.yaml").is_file()
    assert _files(round_trip / "first") == _files(round_trip / "second")


def expected_first_loss(hf_dir: Path, cfg) -> float:
    """The exported weights' loss on the first global batch of a fresh loader over the manifest,
    with step 0's RPO offsets and no saved FAM (step 0 has none): what step 1 must log."""
    from pipeline.checkpointing.whole_model import build_whole_model
    from pipeline.data.loader import ShardLoader
    from pipeline.hf.folder import import_hf
    from pipeline.training.draws import draw_step

    back = import_hf(hf_dir)
    model = build_whole_model(back.state, back.args).train()  # as training runs it (no dropout in this model)
    d = cfg.data
    batches = iter(ShardLoader(d.train_manifest, d.micro_batch_size, d.seq_len, seed=d.seed, shuffle=d.shuffle))
    offsets = draw_step(cfg.train.seed, 0, d.global_batch_size, cfg.model.rope_base, cfg.train.rpo,
                        cfg.train.rsp_probability).offsets
    accum, losses = d.global_batch_size // d.micro_batch_size, []
    with torch.no_grad():
        for a in range(accum):
            tokens = next(batches)["tokens"]
            piece = offsets[a * d.micro_batch_size: (a + 1) * d.micro_batch_size]
            losses.append(float(model(tokens[:, :-1], labels=tokens[:, 1:], position_offset=piece).loss))
    return sum(losses) / accum


def test_imported_checkpoint_resumes_training_with_the_exported_weights_loss(round_trip):
    from pipeline.train import run

    cfg = load_config(round_trip / "ckpt" / "config.yaml", ["--train.exit_after_steps=1"])
    want = expected_first_loss(round_trip / "first", cfg)
    summary = run(cfg)
    assert [s for s, _ in summary["losses"]] == [1]  # resumed at step 0 of the imported checkpoint
    # fp32, the same forward on the same batch in the same order: equal up to the order of the
    # mean's sum (~1e-7 relative); 1e-6 leaves 10x, far below the 0.3+ nats that fresh weights differ by.
    assert summary["losses"][0][1] == pytest.approx(want, rel=1e-6)
    assert (round_trip / "ckpt" / "step_00000001" / "manifest.json").is_file()


def test_fresh_weights_would_give_another_first_loss(round_trip):
    """The resume check above can fail: the same batch through the seed's fresh weights is far off."""
    from model import build_model

    cfg = load_config(round_trip / "ckpt" / "config.yaml")
    want = expected_first_loss(round_trip / "first", cfg)
    fresh = build_model(cfg.model, seed=cfg.train.seed)
    from pipeline.data.loader import ShardLoader

    tokens = next(iter(ShardLoader(cfg.data.train_manifest, 2, cfg.data.seq_len, seed=cfg.data.seed)))["tokens"]
    with torch.no_grad():
        loss = float(fresh(tokens[:, :-1], labels=tokens[:, 1:]).loss)
    assert abs(loss - want) > 0.3


def test_bad_input_is_one_line_each(trained, round_trip, shards, tmp_path, capsys):
    existing = round_trip / "first"
    cases = [
        ("pipeline.export_hf", ["--checkpoint", trained, "--output", existing],
         f"--output {existing}: already exists; choose a new folder or pass --force to replace it"),
        ("pipeline.export_hf", ["--checkpoint", tmp_path / "nowhere", "--output", tmp_path / "out"],
         f"checkpoint {tmp_path / 'nowhere'}: no such file or folder"),
        ("pipeline.export_hf", ["--checkpoint", existing, "--output", tmp_path / "out"],
         "a Hugging Face model folder, not a famtron checkpoint; import it first"),
        ("pipeline.import_hf", [existing, "--output", round_trip / "ckpt", *data_overrides(shards)],
         "already exists; give a new folder for the imported checkpoint"),
        ("pipeline.import_hf", [existing, "--output", tmp_path / "ft"], "no training data: give --data.train_manifest"),
        ("pipeline.import_hf", [existing, "--output", tmp_path / "ft", "--model.num_layers=3", *data_overrides(shards)],
         "--model.num_layers=3: the model comes from the Hugging Face folder's config.json"),
    ]
    results = run_cases([(module, argv) for module, argv, _ in cases], capsys)
    for (module, _, message), result in zip(cases, results):
        assert message in one_line_error(result, module)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()


def test_export_force_replaces_and_dtype_casts(trained, tmp_path):
    from safetensors.torch import load_file

    from pipeline.export_hf import _main as export_main

    export_main(["--checkpoint", str(trained), "--output", str(tmp_path / "hf")])
    export_main(["--checkpoint", str(trained), "--output", str(tmp_path / "hf"), "--force", "--dtype", "bf16"])
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert not list(tmp_path.glob(".tmp_*"))
