"""A training checkpoint as one whole model: its TP=1 state dict, ModelArgs and the run's tokenizer.

    model, args, tokenizer = load_whole_model("runs/x/checkpoints", "cpu")   # newest complete step
    whole = read_whole_checkpoint("runs/x/checkpoints/step_00000100")        # no model built
    whole.state, whole.args, whole.tokenizer, whole.step, whole.path

`path` is a `step_XXXXXXXX` folder, a checkpoint folder (its newest complete step, falling back
past broken ones with a warning, as `checkpoint.resume=auto` does) or a run folder holding
`checkpoints/`. The step folder is verified against its sha256 manifest and every file is read
with torch.load(weights_only=True) (pipeline/checkpointing/files.py). Weights, from any training layout:
    TP shards       model_tpXX[_ppYY].pt, merged by model/weights.py merge_megatron_shards
    PP stages       the stage files of one TP rank hold global layer names: their union
    ZeRO-1/2        the same shard files (whole weights on every DP rank); under bf16 they hold the
                    module's bf16 copy, so the fp32 master weights are consolidated from zero/
    ZeRO-3          shard files hold no weights: zero/ consolidated (pipeline/checkpointing/zero_files.py)
The result has exactly the parameters ModelArgs describes (names and shapes), in fp32 as trained;
anything else is "another architecture", one ValueError naming the key.
The tokenizer is the run's: the training manifest's tokenizer spec (data.train_manifest, or the
first data.train_blend manifest), else eval.tokenizer; it must load and fit the vocabulary.
The model is built in this process at TP=1 (a one-process gloo group if none exists): no launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from model.config import ModelArgs, model_args_from_dict
from pipeline.checkpointing.files import MANIFEST, find_latest_checkpoint, list_checkpoints, load_file, verify_checkpoint


@dataclass
class WholeCheckpoint:
    path: Path  # the step folder read
    step: int
    state: dict[str, torch.Tensor]  # TP=1 megatron names (model/weights.py), parameters only, model order
    args: ModelArgs
    tokenizer: str  # a data_prep tokenizer spec: 'byte', a tokenizer.json or a SentencePiece .model
    config: dict[str, Any]  # the run's resolved config tree (config.yaml)


def find_step_folder(path: str | Path) -> Path:
    """The verified step folder `path` names (see the module docstring); one error if none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or folder")
    if (path / MANIFEST).is_file() or (path / "trainer.pt").is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"checkpoint {path}: {problem}; use another step folder, or give the checkpoint folder "
                             "to take its newest complete one")
        return path
    if list_checkpoints(path):
        latest = find_latest_checkpoint(path)
        if latest is None:
            newest = list_checkpoints(path)[-1][1]
            raise ValueError(f"checkpoint folder {path}: no complete checkpoint (the newest, {newest.name}: "
                             f"{verify_checkpoint(newest)})")
        return latest
    if (path / "checkpoints").is_dir():
        return find_step_folder(path / "checkpoints")
    if (path / "config.json").is_file():
        raise ValueError(f"checkpoint {path}: a Hugging Face model folder, not a famtron checkpoint; "
                         f"import it first: python -m pipeline.import_hf {path} --output DIR")
    raise ValueError(f"checkpoint {path}: not a famtron checkpoint (no {MANIFEST} and no step_XXXXXXXX folders)")


def read_whole_checkpoint(path: str | Path, tokenizer: str | None = None) -> WholeCheckpoint:
    """The whole model's weights, ModelArgs and tokenizer spec (`tokenizer` overrides the run's)."""
    folder = find_step_folder(path)
    config = _config_tree(folder)
    args = _model_args(folder, config)
    trainer = load_file(folder, "trainer.pt")
    state = _check_architecture(folder, _whole_state(folder, trainer), args)
    spec = tokenizer or run_tokenizer(folder, config)
    check_tokenizer(spec, args, folder if tokenizer is None else None)
    return WholeCheckpoint(folder, int(trainer["step"]), state, args, spec, config)


def load_whole_model(path: str | Path, device: str | torch.device = "cpu", tokenizer: str | None = None):
    """(FAMLanguageModel at TP=1 on `device` in eval mode, ModelArgs, tokenizer spec)."""
    whole = read_whole_checkpoint(path, tokenizer)
    return build_whole_model(whole.state, whole.args, device), whole.args, whole.tokenizer


def build_whole_model(state: dict[str, torch.Tensor], args: ModelArgs, device: str | torch.device = "cpu"):
    """A one-process TP=1 FAMLanguageModel holding `state` (TP=1 names), in eval mode."""
    from megatron.core import parallel_state

    from model import build_model

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("load_whole_model builds a TP=1 model, but this process is in a tensor-parallel group of "
                         f"{parallel_state.get_tensor_model_parallel_world_size()}; run it in a plain process")
    model = build_model(args, params_dtype=torch.float32, device=device)
    own = model.state_dict()
    model.load_state_dict({k: v if k.endswith("_extra_state") else state[k] for k, v in own.items()})
    return model.eval()


# ---------------------------------------------------------------- pieces


def _config_tree(folder: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(load_file(folder, "config.yaml"))
    except yaml.YAMLError as err:
        raise ValueError(f"checkpoint {folder}: config.yaml is not valid YAML ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"checkpoint {folder}: config.yaml has no `model` section; not a famtron training checkpoint")
    return config


def _model_args(folder: Path, config: dict[str, Any]) -> ModelArgs:
    """ModelArgs of the config's model section; a key or value famtron does not know is another architecture."""
    try:
        args = model_args_from_dict(config["model"], f"{folder / 'config.yaml'}: model")
        args.validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {folder}: config.yaml describes a model famtron cannot build: {err}") from None
    return args


def _whole_state(folder: Path, trainer: dict) -> dict[str, torch.Tensor]:
    """TP=1 weights from the shard files, or from ZeRO's partitions when the shards hold none (ZeRO-3)
    or only a bf16 module copy (ZeRO-1/2 under bf16: the fp32 masters are in zero/)."""
    tp_size, pp_size = int(trainer["tp_size"]), int(trainer.get("pp_size", 1))
    by_tp = []
    for tp_rank in range(tp_size):
        state: dict[str, torch.Tensor] = {}
        for pp_rank in range(pp_size):
            name = f"model_tp{tp_rank:02d}" + (f"_pp{pp_rank:02d}" if pp_size > 1 else "") + ".pt"
            weights = load_file(folder, name)["model"]
            if weights is None or not _all_fp32(weights):
                by_tp = None
                break
            state.update({k: v for k, v in weights.items() if isinstance(v, torch.Tensor)})
        if by_tp is None:
            break
        by_tp.append(state)
    if by_tp is None:
        by_tp = _consolidated_zero(folder, tp_size)
    if tp_size == 1:
        return by_tp[0]
    from model.weights import merge_megatron_shards

    return merge_megatron_shards(by_tp)


def _all_fp32(weights: dict) -> bool:
    return all(v.dtype == torch.float32 for v in weights.values() if isinstance(v, torch.Tensor))


def _consolidated_zero(folder: Path, tp_size: int) -> list[dict[str, torch.Tensor]]:
    if not (folder / "zero").is_dir():
        raise ValueError(f"checkpoint {folder}: its shard files hold no fp32 weights and it has no zero/ folder to "
                         "consolidate them from")
    from pipeline.checkpointing.zero_files import consolidate_zero_checkpoint

    by_tp = consolidate_zero_checkpoint(folder, "zero")
    if len(by_tp) != tp_size:
        raise ValueError(f"checkpoint {folder}: zero/ holds {len(by_tp)} TP ranks, trainer.pt says {tp_size}")
    return [{k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} for sd in by_tp]


def _check_architecture(folder: Path, state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The state, in model order, if it holds exactly the parameters (names, shapes) args describes."""
    expected = args.parameter_shapes()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    what = f"checkpoint {folder}: its weights are not the model its config.yaml describes (another architecture?)"
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{what}: {name} has shape {tuple(state[name].shape)}, config.yaml's model section "
                             f"says {shape}")
    return {name: state[name].contiguous() for name in expected}


def run_tokenizer(folder: Path, config: dict[str, Any]) -> str:
    """The tokenizer spec the run trained with: its training manifest's, else eval.tokenizer."""
    from data_prep.manifest import load_manifest

    data, evaluation = config.get("data") or {}, config.get("eval") or {}
    manifest = (data.get("train_blend") or [None])[0] or data.get("train_manifest")
    found = manifest and _run_path(manifest, folder, config)
    if found and found.is_file():
        spec = load_manifest(found)["tokenizer"]["spec"]
        as_path = _run_path(spec, folder, config)  # a tokenizer file named relative to the launch folder
        return str(as_path) if as_path.is_file() else spec
    if evaluation.get("tokenizer"):
        return evaluation["tokenizer"]
    raise ValueError(f"checkpoint {folder}: its run's tokenizer is recorded in its training manifest "
                     f"data.train_manifest={manifest!r}, which is not there; give the tokenizer "
                     "(--tokenizer byte | a tokenizer.json | a SentencePiece .model)")


def _run_path(name: str, folder: Path, config: dict[str, Any]) -> Path:
    """A path from the run's config: as given if it exists here, else relative to the folder the
    run was launched from, inferred from where its checkpoints are (checkpoint.dir, relative to
    that folder, ends in the step folder's parent), so that a checkpoint loads from any folder."""
    path = Path(name)
    ckpt_dir = Path(os.path.normpath((config.get("checkpoint") or {}).get("dir") or "."))
    if path.exists() or path.is_absolute() or ckpt_dir.is_absolute() or ckpt_dir == Path("."):
        return path
    parent = Path(folder).resolve().parent.parts
    n = len(ckpt_dir.parts)
    if parent[-n:] != ckpt_dir.parts:
        return path
    return Path(*parent[:-n]) / path


def check_tokenizer(spec: str, args: ModelArgs, folder: Path | None = None) -> None:
    """The tokenizer loads and its ids fit the model's vocabulary (`folder`: where the spec came from)."""
    from data_prep.tokenizer import load_tokenizer

    source = f"checkpoint {folder}'s run tokenizer: " if folder is not None else ""
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as err:
        raise ValueError(f"{source}{err}") from None
    if tok.vocab_size > args.vocab_size:
        raise ValueError(f"{source}tokenizer {spec!r} has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{args.vocab_size}: use the tokenizer the model was trained with")
