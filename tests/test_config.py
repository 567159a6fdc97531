"""The config tree: defaults <- YAML (with base:) <- CLI, typed values, unknown keys, every
validate() clause, the flat MLflow params and the YAML round trip; plus the LR schedule and
the FLOPs formula (pure functions of config)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml

from model.config import ModelArgs
from pipeline.config.load import load_config, parse_overrides, to_flat_dict, to_yaml
from pipeline.config.tree import Config
from pipeline.config.rules import validate
from pipeline.training.flops import attention_keys, flops_per_token, layer_matmul_params, mfu, peak_flops
from pipeline.training.optim import build_optimizer, is_no_decay, lr_at

DATA = ["--data.train_manifest=train/manifest.json"]


def test_yaml_base_and_cli_overrides_are_layered_and_typed(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "base: tiny.yaml\nmodel:\n  num_layers: 2\noptim:\n  lr: 3e-4\n  betas: [0.8, 0.9]\ntrain:\n  steps: 7\n"
    )
    cfg = load_config(tmp_path / "run.yaml", ["--train.steps=9", "--optim.min_lr", "1e-5", "--tracking.run_name=123",
                                              "--data.valid_manifest=null", "--train.rpo=false"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 128  # from the run file and from tiny.yaml
    assert cfg.model.ffn_multiplier == 4.0 and isinstance(cfg.model.ffn_multiplier, float)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.optim.betas == [0.8, 0.9] and cfg.optim.min_lr == 1e-5
    assert cfg.train.steps == 9 and cfg.train.rpo is False
    assert cfg.tracking.run_name == "123" and cfg.data.valid_manifest is None


def test_derived_defaults_are_filled_and_env_sets_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, ["--train.run_dir=runs/exp1"])
    assert cfg.checkpoint.dir == "runs/exp1/checkpoints" and cfg.tracking.run_name == "exp1"
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert load_config(None, []).tracking.tracking_uri == "http://127.0.0.1:5000"
    assert load_config(None, ["--tracking.tracking_uri=sqlite:///x.db"]).tracking.tracking_uri == "sqlite:///x.db"


@pytest.mark.parametrize(
    "source, message",
    [
        ("bogus:\n  a: 1\n", "unknown section(s) ['bogus']"),
        ("train:\n  stepz: 1\n", "unknown key(s) ['stepz'] in `train`; valid keys:"),
        ("model:\n  layers: 1\n", "unknown key(s) ['layers'] in `model`"),
        ("train:\n  steps: many\n", "train.steps='many': expected int"),
        ("optim:\n  betas: 0.9\n", "optim.betas=0.9: expected a list"),
        ("train:\n  rpo: maybe\n", "train.rpo='maybe': expected bool"),
    ],
)
def test_bad_yaml_names_the_key_and_lists_valid_ones(tmp_path, source, message):
    (tmp_path / "bad.yaml").write_text(source)
    with pytest.raises(ValueError) as err:
        load_config(tmp_path / "bad.yaml")
    assert message in str(err.value)
    if "valid keys" in message:
        assert "steps" in str(err.value) or "num_layers" in str(err.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nope.x=1"], "unknown section 'nope'"),
        (["--train.nope=1"], "unknown key(s) ['nope'] in `train`"),
        (["train.steps=1"], "overrides look like --section.key=value"),
        (["--train.steps"], "has no value"),
        (["--train.steps=1.5"], "train.steps=1.5: expected int"),
    ],
)
def test_bad_cli_override_is_a_clear_error(argv, message):
    with pytest.raises(ValueError) as err:
        load_config(None, argv)
    assert message in str(err.value)


def test_string_fields_keep_cli_text_verbatim_and_numbers_are_parsed():
    assert parse_overrides(["--tracking.experiment=1e3", "--train.steps=12"]) == {
        "tracking": {"experiment": "1e3"},
        "train": {"steps": 12},
    }
    cfg = load_config(None, ["--tracking.experiment=1e3", "--train.steps=1e3"])
    assert cfg.tracking.experiment == "1e3" and cfg.train.steps == 1000


def test_flat_dict_and_yaml_round_trip():
    cfg = load_config("tiny", DATA)
    flat = to_flat_dict(cfg)
    assert flat["model.num_layers"] == 4 and flat["optim.grad_clip"] == 1.0 and flat["train.rsp_probability"] == 0.8
    reread = yaml.safe_load(to_yaml(cfg))
    assert reread["model"]["block_size"] == 128 and reread["data"]["train_manifest"] == "train/manifest.json"


def _valid(**changes) -> Config:
    cfg = load_config("tiny", DATA + [f"--{k.replace('__', '.')}={v}" for k, v in changes.items()])
    return cfg


def test_defaults_with_a_manifest_validate():
    validate(_valid(), world_size=1)
    validate(_valid(**{"parallel__tensor_parallel_size": 2, "data__global_batch_size": 8}), world_size=4)
    validate(_valid(**{"parallel__tensor_parallel_size": 2, "parallel__pipeline_parallel_size": 2,
                       "parallel__zero_stage": 1, "data__global_batch_size": 8}), world_size=8)
    validate(_valid(**{"parallel__pipeline_parallel_size": 2, "parallel__pipeline_layout": "[3,1]"}), world_size=2)


@pytest.mark.parametrize(
    "changes, world_size, message",
    [
        ({"model__num_attention_heads": 3}, 1, "model.hidden_size"),  # ModelArgs.validate runs
        ({"parallel__pipeline_parallel_size": 0}, 1, "parallel.pipeline_parallel_size=0"),
        ({"parallel__pipeline_parallel_size": 2, "parallel__zero_stage": 2, "data__global_batch_size": 8}, 4,
         "parallel.zero_stage=2 with parallel.pipeline_parallel_size=2"),
        ({"parallel__pipeline_parallel_size": 2, "parallel__zero_stage": 3, "data__global_batch_size": 8}, 4,
         "parallel.zero_stage=3 with parallel.pipeline_parallel_size=2"),
        ({"parallel__tensor_parallel_size": 2, "parallel__pipeline_parallel_size": 2}, 6,
         "world size 6 is not a multiple of parallel.tensor_parallel_size=2 x parallel.pipeline_parallel_size=2"),
        ({"parallel__pipeline_parallel_size": 3}, 3, "model.num_layers=4 does not divide over 3 pipeline chunks"),
        ({"parallel__pipeline_parallel_size": 2, "parallel__virtual_stages": 3, "parallel__pipeline_schedule":
          "interleaved_1f1b"}, 2, "model.num_layers=4 does not divide over 6 pipeline chunks"),
        ({"parallel__pipeline_parallel_size": 2, "parallel__pipeline_layout": "[1,2]"}, 2,
         "parallel.pipeline_layout=[1, 2]: needs 2 positive layer counts"),
        ({"parallel__tensor_parallel_size": 2, "parallel__sequence_parallel": "true", "model__fam_len": 3}, 2,
         "model.fam_len=3: must be divisible by tensor_parallel_size=2 with sequence parallelism"),
        ({"parallel__tensor_parallel_size": 2, "parallel__sequence_parallel": "true", "data__seq_len": 129}, 2,
         "data.seq_len=129 must be divisible by tensor_parallel_size=2 with sequence parallelism"),
        ({"parallel__sequence_parallel": "true"}, 1, "sequence_parallel=true needs parallel.tensor_parallel_size > 1"),
        ({"parallel__zero_stage": 4}, 1, "parallel.zero_stage=4: must be 0, 1, 2 or 3"),
        ({"parallel__zero_offload_optimizer": "true"}, 1, "parallel.zero_offload_optimizer=true needs"),
        ({"parallel__deepspeed_overrides": "{a: 1}"}, 1, "parallel.deepspeed_overrides is set but"),
        ({"parallel__pipeline_parallel_size": 2, "parallel__virtual_stages": 2}, 2,
         "parallel.virtual_stages=2 needs parallel.pipeline_schedule='interleaved_1f1b'"),
        ({"parallel__pipeline_schedule": "zb"}, 1, "parallel.pipeline_schedule='zb'"),
        ({"parallel__pipeline_parallel_size": 2, "parallel__zero_stage": 1, "parallel__zero_offload_optimizer": "true"},
         2, "parallel.zero_offload_optimizer=true with parallel.pipeline_parallel_size=2"),
        ({"parallel__pipeline_parallel_size": 2, "parallel__pipeline_schedule": "interleaved_1f1b",
          "parallel__virtual_stages": 2, "data__global_batch_size": 4, "data__micro_batch_size": 1}, 8,
         "needs micro-batches per step (1 = data.global_batch_size=4 / (data.micro_batch_size=1 x DP 4))"),
        ({"parallel__tensor_parallel_size": 2}, 3, "world size 3 is not a multiple"),
        ({"parallel__backend": "mpi"}, 1, "parallel.backend='mpi'"),
        ({"data__train_manifest": ""}, 1, "data.train_manifest is not set"),
        ({"data__seq_len": 0}, 1, "data.seq_len=0"),
        ({"data__seq_len": 64}, 1, "data.seq_len=64 and model.block_size=128 do not fit"),
        ({"data__micro_batch_size": 0}, 1, "data.micro_batch_size=0"),
        ({"data__global_batch_size": 6}, 1, "data.global_batch_size=6 must be a positive multiple"),
        ({"data__global_batch_size": 4}, 2, "x data-parallel size 2"),
        ({"optim__lr": 0}, 1, "optim.lr=0.0"),
        ({"optim__min_lr": 1}, 1, "optim.min_lr=1.0"),
        ({"optim__weight_decay": -1}, 1, "optim.weight_decay=-1.0"),
        ({"optim__betas": "[0.9]"}, 1, "optim.betas=[0.9]"),
        ({"optim__eps": 0}, 1, "optim.eps=0.0"),
        ({"optim__grad_clip": -1}, 1, "optim.grad_clip=-1.0"),
        ({"optim__schedule": "linear"}, 1, "optim.schedule='linear'"),
        ({"train__steps": 0, "optim__warmup_steps": 0}, 1, "train.steps=0"),
        ({"optim__warmup_steps": 2000}, 1, "optim.warmup_steps=2000: must be in [0, train.steps=1000]"),
        ({"train__log_interval_steps": 0}, 1, "train.log_interval_steps=0"),
        ({"train__eval_interval_steps": -1}, 1, "train.eval_interval_steps=-1"),
        ({"train__eval_steps": 0}, 1, "train.eval_steps=0"),
        ({"train__exit_after_steps": 0}, 1, "train.exit_after_steps=0"),
        ({"train__max_wall_seconds": 0}, 1, "train.max_wall_seconds=0.0"),
        ({"train__max_nonfinite_steps": -1}, 1, "train.max_nonfinite_steps=-1"),
        ({"parallel__timeout_seconds": 0}, 1, "parallel.timeout_seconds=0.0"),
        ({"train__rsp_probability": 1.5}, 1, "train.rsp_probability=1.5"),
        ({"train__device": "tpu"}, 1, "train.device='tpu'"),
        ({"train__precision": "fp16"}, 1,
         "train.precision='fp16': must be one of auto, fp32, bf16-autocast, bf16-mixed"),
        ({"train__precision": "bf16-autocast", "parallel__zero_stage": 1}, 1,
         "train.precision=bf16-autocast with parallel.zero_stage=1"),
        ({"train__peak_tflops": 0}, 1, "train.peak_tflops=0.0"),
        ({"checkpoint__save_interval_steps": -1}, 1, "checkpoint.save_interval_steps=-1"),
        ({"checkpoint__keep_last": 0}, 1, "checkpoint.keep_last=0"),
        ({"checkpoint__resume": "/no/such/step_00000001"}, 1, "checkpoint.resume='/no/such/step_00000001'"),
        ({"tracking__flush_interval_steps": 0}, 1, "tracking.flush_interval_steps=0"),
    ],
)
def test_each_validate_rule_names_its_keys(changes, world_size, message):
    with pytest.raises(ValueError) as err:
        validate(_valid(**changes), world_size=world_size)
    assert message in str(err.value)


def test_dense_attention_allows_seq_len_below_block_size():
    validate(_valid(**{"model__attention": "dense", "data__seq_len": 64}))


# ---------------------------------------------------------------- LR schedule and optimizer groups


def test_lr_warms_up_linearly_then_cosine_decays_to_min_lr():
    cfg = load_config(None, ["--optim.lr=1.0", "--optim.min_lr=0.1", "--optim.warmup_steps=4"]).optim
    lrs = [lr_at(s, cfg, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[12] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, cfg, 20) == pytest.approx(0.1) and lr_at(100, cfg, 20) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_and_fam_prompt():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fam_prompt = torch.nn.Parameter(torch.zeros(4, 8))
            self.proj = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)

    model = Tiny()
    names = {n for n, p in model.named_parameters() if is_no_decay(n, p)}
    assert names == {"fam_prompt", "proj.bias", "norm.weight", "norm.bias"}
    opt = build_optimizer(model, load_config(None, []).optim)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["params"] == [model.proj.weight]


# ---------------------------------------------------------------- FLOPs


def test_flops_per_token_matches_a_hand_count_for_fam():
    # L=1, h=8, n=2 heads of d=4, g=2, ffn=16, V=10, C=4, m=1, F=2, s=8 (two blocks).
    args = ModelArgs(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, vocab_size=10,
                     block_size=4, mem_blocks=1, fam_len=2)
    assert layer_matmul_params(args) == 8 * 6 * 4 + 8 * 8 + 3 * 8 * 16 == 640
    # block 0 queries see F=2 prompt keys + 1..4 causal; block 1 also the 4 memory keys.
    # FAM queries see F + C = 6 keys, 2 of them per block.
    assert attention_keys(args, 8) == ((3 + 4 + 5 + 6) + (7 + 8 + 9 + 10), 2 * 2 * 6)
    matmul = 6 * (640 * (8 + 4) + 8 * 10 * 8)  # 8 block + 4 FAM tokens through the layer; logits for 8
    attention = 12 * 2 * 4 * (52 + 24)
    assert flops_per_token(args, 8) == (matmul + attention) / 8 == 7152.0


def test_flops_partial_block_bswa_and_dense():
    args = ModelArgs(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16, vocab_size=10,
                     block_size=4, mem_blocks=1, fam_len=2)
    assert attention_keys(args, 6) == ((3 + 4 + 5 + 6) + (7 + 8), 2 * 6 + 2 * 4)  # last block has 2 tokens
    bswa = ModelArgs(**{**args.__dict__, "fam_len": 0})
    assert attention_keys(bswa, 8) == ((1 + 2 + 3 + 4) + (5 + 6 + 7 + 8), 0)
    dense = ModelArgs(**{**args.__dict__, "attention": "dense"})
    assert attention_keys(dense, 8) == (36, 0)  # k-bar = (s + 1) / 2
    assert flops_per_token(dense, 8) == (6 * (640 * 8 + 80 * 8) + 12 * 8 * 36) / 8


def test_peak_and_mfu():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), peak_tflops=2.0) == 2e12
    assert mfu(1000.0, 1e9, None, 1) is None
    assert mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)


# ---------------------------------------------------------------- --help and resuming with another config


def test_help_describes_every_model_key_and_shows_the_values_of_the_config_given(capsys):
    from pipeline.train import main

    with pytest.raises(SystemExit) as exited:
        main(["--config", "demo", "--train.steps=7", "--help"])
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for f in dataclasses.fields(ModelArgs):
        line = next(line for line in lines if line.startswith(f"  --model.{f.name}="))
        assert len(line.split("  ")[-1]) > 10, line  # a description after the value
    # demo.yaml's values (from tiny.yaml through `base:`) and the override, each with the default beside it
    for shown in ("--model.num_layers=4 (default 2)", "--optim.lr=0.002 (default 0.0003)",
                  "--train.steps=7 (default 1000)", "--data.seq_len=512  "):
        assert any(line.startswith(f"  {shown}") for line in lines), shown


def test_resume_config_changes_name_the_keys_that_may_not_change():
    from pipeline.config.resume import check_resume_config, resume_config_changes

    saved = to_yaml(load_config("demo"))
    safe = ["--train.steps=500", "--train.run_dir=elsewhere", "--checkpoint.keep_last=9", "--tracking.experiment=x",
            "--parallel.tensor_parallel_size=2", "--data.verify_checksums=false", "--model.recompute=true"]
    assert resume_config_changes(saved, load_config("demo", safe)) == []
    cfg = load_config("demo", [*safe, "--optim.lr=1e-3", "--model.num_layers=3", "--data.seed=7"])
    assert resume_config_changes(saved, cfg) == [("model.num_layers", 4, 3), ("data.seed", 1234, 7),
                                                 ("optim.lr", 0.002, 0.001)]
    with pytest.raises(ValueError, match=r"checkpoint ck was trained with another config: model.num_layers 4 -> 3, "
                                         r"data.seed 1234 -> 7, optim.lr 0.002 -> 0.001\. .*give a new train.run_dir"):
        check_resume_config(saved, cfg, "ck")
    older = yaml.safe_load(saved)
    del older["train"]["rpo"]  # a key an older famtron did not write is not compared
    assert resume_config_changes(yaml.safe_dump(older), load_config("demo", ["--train.rpo=false"])) == []
