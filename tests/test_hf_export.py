"""Hugging Face export (pipeline/hf): transformers runs the exported model with famtron's logits.

The chain: megatron model at TP=1 (itself tested against model/reference.py) => the exported
folder loaded by `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`, for FAM,
BSWA, GQA, MQA and dense attention; greedy `generate()` with the FAM cache => step-by-step argmax
of famtron's full forward; TP=2 shards gathered => the same files as TP=1; export -> import ->
export => the same bytes; lm-eval's CLI scores an export on a local task.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import build_model
from model.config import ModelArgs
from pipeline.hf.folder import export_hf, import_hf
from tests.spawn import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
LM_EVAL_TASKS = ROOT / "tests" / "data" / "lm_eval"

# fp32. famtron runs layer-major (all blocks in one masked attention, the FAM scan apart), the
# export block by block, so the two differ by rounding only: ~1e-7 relative per op, a few 1e-6
# after 3 layers. 2e-5 of the largest logit leaves a 5-10x margin; the bugs the mutation checks
# planted (a FAM key position off by one, a non-zero first residual, swapped K/V groups) moved
# the logits by 1e-2 or more of it.
RTOL = 2e-5
SEQ = 37  # 4 whole blocks of 8 and a partial one


def small(**overrides) -> ModelArgs:
    """3 layers (so layer 2's initial FAM comes from two layers of the prompt stream), GQA, block
    8, one memory block, F = 3. A wide init (std 0.2) gives peaked attention and logits of a few
    units, so a wrong position or residual moves them far beyond rounding."""
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_multiplier=2,
                vocab_size=256, block_size=8, mem_blocks=1, fam_len=3, init_method_std=0.2)
    base.update(overrides)
    return ModelArgs(**base)


CASES = {
    "fam_gqa": {},
    "fam_mha": {"num_query_groups": None},
    "fam_mqa": {"num_query_groups": 1},
    "bswa_gqa": {"fam_len": 0},
    "dense": {"attention": "dense", "fam_len": 0},
}


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> bool:
    return (got - want).abs().max().item() <= rtol * want.abs().max().item()


def tokens_for(args: ModelArgs, batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def export_and_load(args: ModelArgs, folder: Path, seed: int = 5, **export_kwargs):
    """(famtron model, the transformers model loaded from its export)."""
    from transformers import AutoModelForCausalLM

    model = build_model(args, seed=seed)
    export_hf(model.state_dict(), args, folder, **export_kwargs)
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    return model.eval(), hf.eval()


@pytest.mark.parametrize("case", CASES)
def test_transformers_logits_and_loss_equal_famtron(case, tmp_path):
    args = small(**CASES[case])
    # fam_gqa also checks a sharded export (shards of at most 40 kB) loads the same.
    shard = {"max_shard_bytes": 40_000} if case == "fam_gqa" else {}
    model, hf = export_and_load(args, tmp_path / case, **shard)
    if shard:
        assert (tmp_path / case / "model.safetensors.index.json").exists()
    tokens = tokens_for(args)
    with torch.no_grad():
        want = model(tokens).logits
        got = hf(tokens)
        assert got.logits.shape == want.shape and close(got.logits, want), case
        # transformers' loss convention: labels = input_ids, shifted inside the model.
        want_loss = model(tokens[:, :-1], labels=tokens[:, 1:]).loss
        assert abs(hf(tokens, labels=tokens).loss.item() - want_loss.item()) <= RTOL * want_loss.item()
        # The cache continues a sequence at any cut, inside a block or on its edge.
        pieces, cache = [], None
        for lo, hi in ((0, 5), (5, 16), (16, 17), (17, SEQ)):
            out = hf(tokens[:, lo:hi], past_key_values=cache)
            pieces.append(out.logits)
            cache = out.past_key_values
        assert close(torch.cat(pieces, dim=1), want)


@pytest.mark.parametrize("case", ["fam_gqa", "bswa_gqa", "dense"])
def test_greedy_generate_with_cache_equals_argmax_of_famtron_full_forward(case, tmp_path):
    args = small(**CASES[case])
    model, hf = export_and_load(args, tmp_path / case)
    prompt, new = tokens_for(args, batch=1, seq=5), 30  # positions 5..34 cross 4 block edges
    out = hf.generate(prompt, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    eos = hf.generation_config.eos_token_id  # generate() stops after the end-of-document token
    expected, margins = prompt, []
    with torch.no_grad():
        for _ in range(new):
            last = model(expected).logits[0, -1]
            top2 = last.topk(2).values
            margins.append((top2[0] - top2[1]).item() / last.abs().max().item())
            expected = torch.cat([expected, last.argmax().view(1, 1)], dim=1)
            if expected[0, -1].item() == eos:
                break
    # A step whose top two logits were within rounding would make the comparison a coin toss.
    assert min(margins) > 10 * RTOL
    assert out.sequences.tolist() == expected.tolist()
    assert expected.shape[1] == prompt.shape[1] + new  # no early stop: all 4 block edges crossed
    if case != "dense":  # O(1) state: F rows, m blocks of K/V, the current block's K/V
        cache, length = out.past_key_values, prompt.shape[1] + new - 1  # the last token is not fed back
        assert cache.position == length
        for state in cache.layers:
            assert state.mem_k.shape[2] == args.mem_blocks * args.block_size
            assert state.part_k.shape[2] == length % args.block_size
            assert state.fam is None if case == "bswa_gqa" else state.fam.shape == (1, args.fam_len, args.hidden_size)


def test_right_padding_leaves_real_tokens_alone_and_left_padding_is_refused(tmp_path):
    """Rows share positions, so only trailing padding is sound (a later token never changes an
    earlier one's logits); left padding and continuing a padded cache are clear errors."""
    args = small()
    _, hf = export_and_load(args, tmp_path / "hf")
    tokens = tokens_for(args, batch=2, seq=20)
    mask = torch.ones_like(tokens)
    mask[1, 13:] = 0  # row 1 is 13 tokens long, right-padded
    with torch.no_grad():
        out = hf(tokens, attention_mask=mask)
        assert close(out.logits[1, :13], hf(tokens[1:, :13]).logits[0])  # rounding only (batch of 2 vs 1)
        with pytest.raises(ValueError, match="saw padded rows"):
            hf(tokens[:, :1], past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match="left or inner padding"):
            hf(tokens, attention_mask=mask.flip(1))


def _make_tokenizer(kind: str, folder: Path) -> str:
    """A data_prep tokenizer spec: 'byte', a trained tokenizer.json, or a SentencePiece model."""
    if kind == "byte":
        return "byte"
    text = folder / "corpus" / "doc.txt"
    text.parent.mkdir(parents=True)
    lines = (f"def alpha_{i}(beta, gamma):\n    return beta + gamma * {i}  # héllo" for i in range(60))
    text.write_text("\n".join(lines))
    if kind == "hf":
        from data_prep import train_tokenizer

        train_tokenizer.main(["--input", str(text.parent), "--vocab-size", "300", "--output",
                              str(folder / "tok.json"), "--no-progress"])
        return str(folder / "tok.json")
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sp"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    return str(folder / "sp.model")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("tokenizer", ["byte", "hf", "sp"])
def test_export_import_export_round_trips_bit_for_bit_with_its_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_tokenizer

    args = small(vocab_size=320)  # room for the 300 ids of the trained BPE
    state = build_model(args, seed=7).state_dict()
    spec = _make_tokenizer(tokenizer, tmp_path)
    first = export_hf(state, args, tmp_path / "first", tokenizer=spec, max_shard_bytes=40_000)
    back = import_hf(first)
    # config.json stores the FFN width, not the multiplier it came from.
    assert dataclasses.replace(back.args, ffn_multiplier=args.ffn_multiplier, ffn_hidden_size=None) == args
    for name, value in state.items():
        if not name.endswith("_extra_state"):
            assert torch.equal(back.state[name], value), name
    second = export_hf(back.state, back.args, tmp_path / "second", tokenizer=back.tokenizer, max_shard_bytes=40_000)
    assert _files(first) == _files(second)
    assert len([n for n in _files(first) if n.endswith(".safetensors")]) > 1  # sharded

    # transformers' tokenizer gives famtron's ids, with the end-of-document token as eos.
    ours, theirs = load_tokenizer(spec), AutoTokenizer.from_pretrained(first, trust_remote_code=True)
    text = "def alpha_7(beta, gamma):\n    return beta * 2  # héllo wörld"
    assert theirs(text)["input_ids"] == ours.encode(text)
    generation = json.loads((first / "generation_config.json").read_text())
    assert theirs.eos_token_id == ours.eod_id == generation["eos_token_id"] == generation["pad_token_id"]


def test_a_folder_saved_by_transformers_imports_to_the_same_weights(tmp_path):
    """Fine-tuned with transformers and saved with save_pretrained (no famtron manifest): the way
    back still gives famtron's names, layouts and shapes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = small()
    state = build_model(args, seed=3).state_dict()
    export_hf(state, args, tmp_path / "hf")
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).save_pretrained(tmp_path / "saved")
    AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True).save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "famtron_export.json").exists()
    back = import_hf(tmp_path / "saved")
    assert back.args == import_hf(tmp_path / "hf").args and back.tokenizer == "byte"
    for name, value in state.items():
        if not name.endswith("_extra_state"):
            assert torch.equal(back.state[name], value), name


def _tp2_export_worker(rank, world_size, folder):
    import torch.distributed as dist

    from model import build_model
    from model.weights import merge_megatron_shards
    from pipeline.parallel.groups import start_groups, stop_groups

    groups = start_groups(tensor_parallel_size=world_size)
    args = small()
    model = build_model(args, seed=11, tp_group=groups.tp_group)
    shard = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    shards = [{} for _ in range(world_size)]
    for name, value in shard.items():
        parts = [torch.empty_like(value) for _ in range(world_size)]
        dist.all_gather(parts, value.contiguous(), group=groups.tp_group)
        for r in range(world_size):
            shards[r][name] = parts[r]
    if rank == 0:
        export_hf(merge_megatron_shards(shards), args, folder)
    stop_groups()
    return None


def test_weights_gathered_from_tp2_export_the_same_files_as_tp1(tmp_path):
    run_on_ranks(_tp2_export_worker, 2, str(tmp_path / "tp2"))
    export_hf(build_model(small(), seed=11).state_dict(), small(), tmp_path / "tp1")
    assert _files(tmp_path / "tp2") == _files(tmp_path / "tp1")


def _edit_config(folder: Path, **changes) -> None:
    """Hand-edit config.json, as a user would (and drop the export manifest that would now
    flag the edited file: a folder saved by transformers has none either)."""
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "famtron_export.json").unlink()


@pytest.mark.parametrize("changes, message", [
    ({"attention_kind": "sparse"}, r"config.json attention_kind='sparse': the famtron modeling file serves"),
    ({"num_key_value_heads": 3}, r"config.json num_key_value_heads=3: must divide num_attention_heads=4"),
    ({"fam_len": 9}, r"config.json fam_len=9: attention_kind 'fam' needs 0 < fam_len <= block_size=8"),
])
def test_unsupported_config_json_is_one_clear_error(changes, message, tmp_path):
    from transformers import AutoModelForCausalLM

    args = small()
    export_hf(build_model(args).state_dict(), args, tmp_path / "hf")
    _edit_config(tmp_path / "hf", **changes)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        import_hf(tmp_path / "hf")


def test_missing_or_corrupt_weights_file_is_one_clear_error(tmp_path):
    from transformers import AutoModelForCausalLM

    args = small()
    folder = export_hf(build_model(args).state_dict(), args, tmp_path / "hf")
    weights = folder / "model.safetensors"
    content = weights.read_bytes()

    weights.unlink()
    for load in (import_hf, lambda f: AutoModelForCausalLM.from_pretrained(f, trust_remote_code=True)):
        with pytest.raises(ValueError, match=r"model.safetensors: missing \(listed in famtron_export.json\)"):
            load(folder)

    weights.write_bytes(content[: len(content) // 2])  # truncated: transformers' loader sees the size
    with pytest.raises(ValueError, match=r"model.safetensors: \d+ bytes where famtron_export.json says \d+: damaged"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    flipped = bytearray(content)
    flipped[-5] ^= 0xFF  # same size, one weight changed: famtron's import checks the sha256
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt \(sha256 differs"):
        import_hf(folder)
    (folder / "famtron_export.json").unlink()  # no manifest: the damaged file itself is named
    weights.write_bytes(content[:100])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        import_hf(folder)


def test_export_refuses_an_existing_folder_and_a_state_that_does_not_match(tmp_path):
    args = small()
    state = build_model(args).state_dict()
    folder = export_hf(state, args, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"hf: already exists; choose a new folder or pass force"):
        export_hf(state, args, folder)
    export_hf(state, args, folder, force=True)
    assert not list(tmp_path.glob(".tmp_*"))  # the replaced export and the temp folder are gone
    with pytest.raises(ValueError, match=r"missing \['layers.2.attention.linear_proj.weight'"):
        export_hf({k: v for k, v in state.items() if "layers.2.attention.linear_proj" not in k}, args, tmp_path / "x")
    with pytest.raises(ValueError, match=r"state dict fam_prompt: shape \(3, 32\), the model config says \(4, 32\)"):
        export_hf(state, small(fam_len=4), tmp_path / "x")


def test_lm_eval_cli_scores_an_export_on_the_local_task(tmp_path):
    """`lm_eval --model hf ... trust_remote_code=True` on the repo's JSONL task, offline. About
    20 s of CPU on an idle machine (most of it importing lm_eval); the timeout only guards a hang."""
    args = small(init_method_std=0.02)
    export_hf(build_model(args).state_dict(), args, tmp_path / "hf")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32", "--tasks", "famtron_python",
         "--include_path", str(LM_EVAL_TASKS), "--device", "cpu", "--batch_size", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("|famtron_python")]
    assert len(rows) == 1 and "|acc " in rows[0], run.stdout
    score = float(rows[0].split("|")[7])
    assert 0.0 <= score <= 1.0
