"""pipeline/checkpointing/whole_model.py: a checkpoint saved by pipeline.train at TP=2 x PP=2 and one
at DP=2 ZeRO-3 read as the same TP=1 state dict as the same weights saved at TP=1, and exported by
`python -m pipeline.export_hf` to byte-identical folders (issue 16's acceptance); the model it
builds runs at TP=1 in one process; bad checkpoints get one clear error each.

"The same weights" in every layout: the runs train with optim.lr=1e-30, so AdamW's update (at most
~1e-29 per weight) rounds away and its decay factor (1 - 1e-31) is exactly 1 in fp32; every layout
starts from the same weights (model/init.py draws each tensor whole from the seed and its name).
So the layouts hold bit-identical trained-through weights and any mistake in joining stages,
merging TP shards or consolidating ZeRO partitions shows as a difference, not as rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.checkpointing.whole_model import load_whole_model, read_whole_checkpoint
from pipeline.export_hf import _main as export_main
from tests.spawn import run_on_ranks
from tests.trained_checkpoints import copy_step, edit_model_config, rewrite_file, train_tiny

# 4 layers (2 per pipeline stage), 2 heads (1 per TP rank), micro-batches of 2, global batch 4.
SAME_WEIGHTS = dict(model__num_layers=4, optim__lr=1e-30, optim__min_lr=0.0, train__steps=2, optim__warmup_steps=1)


def _train_worker(rank: int, world_size: int, shards: str, run_dir: str, extra: dict) -> str:
    torch.set_num_threads(1)
    return str(train_tiny(Path(shards), Path(run_dir), **{**SAME_WEIGHTS, **extra}))


@pytest.fixture(scope="module")
def tp1(shards, tmp_path_factory) -> Path:
    return train_tiny(shards, tmp_path_factory.mktemp("tp1") / "run", **SAME_WEIGHTS)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


LAYOUTS = {
    "tp2_pp2": (4, dict(parallel__tensor_parallel_size=2, parallel__pipeline_parallel_size=2)),
    "dp2_zero3": (2, dict(parallel__zero_stage=3)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reads_as_the_tp1_state_and_exports_the_same_files(layout, shards, tp1, tmp_path):
    world, extra = LAYOUTS[layout]
    step = Path(run_on_ranks(_train_worker, world, str(shards), str(tmp_path / "run"), extra)[0])
    files = {p.name for p in step.iterdir()}
    if layout == "tp2_pp2":
        assert {"model_tp00_pp00.pt", "model_tp01_pp01.pt"} <= files
    else:
        assert (step / "zero" / "famtron_zero.json").is_file()  # shard files hold no weights: consolidated
    got, want = read_whole_checkpoint(step), read_whole_checkpoint(tp1)
    assert got.step == want.step == 2 and got.args == want.args and got.tokenizer == want.tokenizer == "byte"
    assert list(got.state) == list(want.state)
    for name, value in want.state.items():
        assert got.state[name].dtype == torch.float32 and torch.equal(got.state[name], value), name
    export_main(["--checkpoint", str(step), "--output", str(tmp_path / "hf")])
    export_main(["--checkpoint", str(tp1), "--output", str(tmp_path / "hf_tp1")])
    assert _files(tmp_path / "hf") == _files(tmp_path / "hf_tp1")


def test_whole_model_is_a_one_process_tp1_model_with_the_checkpoints_weights(shards, tmp_path):
    """Trained with a real learning rate (the weights are not the seed's fresh ones, which a model
    that skipped loading would also hold)."""
    step = train_tiny(shards, tmp_path / "run", train__steps=2, optim__warmup_steps=1)
    model, args, tokenizer = load_whole_model(tmp_path / "run", "cpu")  # a run folder: its newest checkpoint
    assert model.config.tensor_model_parallel_size == 1 and len(model.layers) == args.num_layers == 2
    assert not model.training and tokenizer == "byte"
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    state = read_whole_checkpoint(step).state
    with torch.no_grad():
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert torch.isfinite(model(tokens).logits).all()


def test_a_run_launched_with_relative_paths_loads_from_any_folder(shards, tmp_path, monkeypatch):
    """make demo's layout: data and run folder named relative to the launch folder. The tokenizer,
    recorded in the training manifest named by that relative path, is found from another folder."""
    launch = tmp_path / "repo"
    (launch / "data").mkdir(parents=True)
    (launch / "data" / "shards").symlink_to(shards)
    monkeypatch.chdir(launch)
    train_tiny(Path("data/shards"), Path("runs/demo"), train__steps=1, optim__warmup_steps=1)
    monkeypatch.chdir(tmp_path)  # elsewhere: data/shards/... is not here
    assert not Path("data/shards").exists()
    _, _, tokenizer = load_whole_model(launch / "runs" / "demo" / "checkpoints", "cpu")
    assert tokenizer == "byte"


def test_a_checkpoint_folder_gives_its_newest_complete_step(shards, tmp_path):
    run = tmp_path / "run"
    train_tiny(shards, run, train__steps=2, checkpoint__save_interval_steps=1, optim__warmup_steps=1)
    folder = run / "checkpoints"
    assert read_whole_checkpoint(folder).path.name == "step_00000002"
    data = bytearray((folder / "step_00000002" / "model_tp00.pt").read_bytes())
    data[-100] ^= 0xFF  # the newest is corrupt: a checkpoint folder falls back past it, a step folder refuses it
    (folder / "step_00000002" / "model_tp00.pt").write_bytes(bytes(data))
    assert read_whole_checkpoint(folder).path.name == "step_00000001"
    with pytest.raises(ValueError, match=r"step_00000002: model_tp00.pt does not match its sha256 in manifest.json"):
        read_whole_checkpoint(folder / "step_00000002")


def test_bad_checkpoints_get_one_clear_error_each(tp1, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint \S*missing: no such file or folder"):
        read_whole_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a famtron checkpoint \(no manifest.json and no step_XXXXXXXX folders\)"):
        read_whole_checkpoint(tmp_path / "empty")
    wide = copy_step(tp1, tmp_path / "wide" / tp1.name)
    edit_model_config(wide, hidden_size=64)
    with pytest.raises(ValueError, match=r"another architecture\?\): embedding.weight has shape \(256, 32\), "
                                         r"config.yaml's model section says \(256, 64\)"):
        read_whole_checkpoint(wide)
    alien = copy_step(tp1, tmp_path / "alien" / tp1.name)
    edit_model_config(alien, attention="mamba")
    with pytest.raises(ValueError, match=r"describes a model famtron cannot build: model.attention='mamba'"):
        read_whole_checkpoint(alien)
    unsafe = copy_step(tp1, tmp_path / "unsafe" / tp1.name)
    import pickle

    rewrite_file(unsafe, "trainer.pt", pickle.dumps(print, protocol=2))  # complete, but pickled code
    with pytest.raises(ValueError, match=r"trainer.pt holds pickled Python objects that torch.load\(weights_only"):
        read_whole_checkpoint(unsafe)
    with pytest.raises(ValueError, match="tokenizer 'bpe-32k' is neither 'byte' nor an existing file"):
        read_whole_checkpoint(tp1, tokenizer="bpe-32k")
