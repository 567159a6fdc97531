"""Write and read a Hugging Face model folder for a famtron model.

    export_hf(state, args, "out/hf", tokenizer="byte")   # famtron TP=1 state dict -> folder
    back = import_hf("out/hf")                           # -> back.state, back.args, back.tokenizer

The folder (every file deterministic, so export -> import -> export is bit for bit):
    config.json                      model_type famtron, auto_map, FAM fields (convert.py)
    configuration_famtron.py         copied verbatim from this folder: the remote code
    modeling_famtron.py
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                     once the weights pass `max_shard_bytes`
    tokenizer.json | tokenizer.model, tokenizer_config.json   (tokenizer_files.py)
    generation_config.json           eos = pad = the end-of-document id, greedy
    famtron_export.json              size and sha256 of every other file, written last
It is written into a hidden temp folder beside the output and renamed into place, so a crash
leaves no half-written export. An import checks every checksum it finds.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.manifest import fsync_dir, sha256_file
from model.config import ModelArgs
from pipeline.checkpointing.files import fsync_path
from pipeline.hf.convert import args_from_hf_config, from_hf_state, to_hf_config, to_hf_state
from pipeline.hf.tokenizer_files import tokenizer_files, tokenizer_spec_in

CODE_FILES = ("configuration_famtron.py", "modeling_famtron.py")
CODE_DIR = Path(__file__).resolve().parent
MANIFEST = "famtron_export.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


@dataclass
class HFImport:
    state: dict[str, torch.Tensor]  # famtron TP=1 names (model/weights.py)
    args: ModelArgs
    tokenizer: str  # a data_prep tokenizer spec: 'byte' or the tokenizer file in the folder


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def shard_weights(hf_state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors, each at most max_shard_bytes unless one tensor is larger."""
    shards, size = [{}], 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_weights(folder: Path, hf_state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards = shard_weights(hf_state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    (folder / INDEX_FILE).write_bytes(_json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map}))


def export_hf(state: dict[str, torch.Tensor], args: ModelArgs, output: str | Path, tokenizer: str = "byte",
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False) -> Path:
    """Write the HF folder for a famtron TP=1 state dict (weights kept in their dtype).
    An existing `output` is an error unless force=True (then it is replaced whole)."""
    output = Path(output)
    if output.exists() and not force:
        raise ValueError(f"{output}: already exists; choose a new folder or pass force to replace it")
    hf_state = to_hf_state(state, args)
    dtypes = {t.dtype for t in hf_state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"the state dict mixes dtypes {sorted(map(str, dtypes))}: cast it to one first")
    tok_files, tok_entries = tokenizer_files(tokenizer, args.vocab_size)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp_{output.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed export
    tmp.mkdir()
    _write_weights(tmp, hf_state, max_shard_bytes)
    files = {
        "config.json": _json_bytes(to_hf_config(args, dtypes.pop(), tok_entries)),
        "generation_config.json": _json_bytes({
            "eos_token_id": tok_entries["eos_token_id"], "pad_token_id": tok_entries["pad_token_id"],
            "do_sample": False,
        }),
        **{name: (CODE_DIR / name).read_bytes() for name in CODE_FILES},
        **tok_files,
    }
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    entries = {}
    for path in sorted(tmp.iterdir()):
        fsync_path(path)
        entries[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(str(path))}
    (tmp / MANIFEST).write_bytes(_json_bytes({"format": "famtron-hf-export/1", "files": entries}))
    fsync_path(tmp / MANIFEST)
    fsync_dir(str(tmp))
    _publish(tmp, output)
    return output


def _publish(tmp: Path, final: Path) -> None:
    """Rename tmp into place; an existing final (force) is swapped out first, then deleted."""
    if final.exists():
        old = final.parent / f".tmp_old_{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(str(final.parent))


def verify_export(folder: Path) -> None:
    """Check famtron_export.json's checksums, if the folder has one (a folder saved by
    transformers' save_pretrained, e.g. after fine-tuning, has none)."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return
    for name, entry in json.loads(manifest.read_text())["files"].items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {MANIFEST}); re-export the model")
        if sha256_file(str(path)) != entry["sha256"]:
            raise ValueError(f"{path}: corrupt (sha256 differs from {MANIFEST}); re-export the model")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    if (folder / INDEX_FILE).exists():
        files = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
    elif (folder / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; not an exported model folder")
    weights = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {INDEX_FILE})")
        try:
            weights.update(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: not a readable safetensors file ({err}); re-export the model") from None
    return weights


def import_hf(folder: str | Path) -> HFImport:
    """An exported (or save_pretrained) HF folder -> famtron TP=1 state dict, ModelArgs, tokenizer."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; not a Hugging Face model folder")
    verify_export(folder)
    config = json.loads((folder / "config.json").read_text())
    args = args_from_hf_config(config, str(folder / "config.json"))
    state = from_hf_state(read_weights(folder), args)
    return HFImport(state, args, tokenizer_spec_in(folder, config))
