"""`python -m pipeline.generate` on a checkpoint trained by pipeline.train: the tokens equal
model.generation's on the same weights read straight from the shard file (greedy and sampled),
greedy equals transformers' generate() on the exported folder across several block boundaries,
and each kind of bad input ends in one stderr line (exit 2)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from model import Sampling, build_model, generate
from model.config import model_args_from_dict
from pipeline.checkpointing.files import load_file
from pipeline.generate import _main as generate_main
from tests.trained_checkpoints import copy_step, edit_model_config, one_line_error, run_cases, train_tiny

PROMPT = "def memory_state(memory, state=3):\n    return memo"  # 50 bytes: 3 blocks of 16 and 2 tokens
NEW = 40  # positions 50..89 cross the block edges at 64 and 80


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    return train_tiny(shards, tmp_path_factory.mktemp("gen") / "run")


def model_from_shard_file(step):
    """The independent route: config.yaml's model section and model_tp00.pt, loaded by hand."""
    import yaml

    args = model_args_from_dict(yaml.safe_load(load_file(step, "config.yaml"))["model"])
    model = build_model(args)
    own = model.state_dict()
    saved = load_file(step, "model_tp00.pt")["model"]
    model.load_state_dict({k: v if k.endswith("_extra_state") else saved[k] for k, v in own.items()})
    return model.eval()


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--seed", "4"]])
def test_cli_tokens_equal_model_generation_on_the_same_weights(sampling, trained):
    out = generate_main(["--checkpoint", str(trained.parent), "--prompt", PROMPT, "--max-new-tokens", str(NEW),
                         "--prefill-chunk-blocks", "2", *sampling])
    assert out["checkpoint"] == str(trained) and out["prompt_ids"] == list(PROMPT.encode())
    settings = Sampling(0.9, 20, 0.95) if sampling else Sampling()
    want = generate(model_from_shard_file(trained), torch.tensor([out["prompt_ids"]]), NEW, settings, stop_tokens=[0],
                    generator=torch.Generator().manual_seed(4))
    assert out["new_ids"] == want.tokens[0, : int(want.lengths[0])].tolist()
    assert len(out["new_ids"]) == NEW and len(set(out["new_ids"])) > 5  # no early stop; not one repeated byte
    assert out["text"] == bytes(out["new_ids"]).decode("utf-8", errors="replace")


def test_cli_greedy_equals_transformers_generate_on_the_export(trained, tmp_path):
    """Through the exported folder (pipeline.export_hf) and transformers' own greedy loop with the
    FAM cache: the same tokens, across the block edges at 64 and 80."""
    from transformers import AutoModelForCausalLM

    from pipeline.export_hf import _main as export_main

    export_main(["--checkpoint", str(trained), "--output", str(tmp_path / "hf")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    out = generate_main(["--checkpoint", str(trained), "--prompt", PROMPT, "--max-new-tokens", str(NEW)])
    prompt = torch.tensor([out["prompt_ids"]])
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=NEW, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    # A step whose top two logits were within rounding (~1e-6 of the largest) would make the
    # comparison a coin toss: each margin must be far above it.
    margins = [float((s[0].topk(2).values[0] - s[0].topk(2).values[1]) / s[0].abs().max()) for s in theirs.scores]
    assert min(margins) > 1e-4
    assert theirs.sequences[0, prompt.shape[1]:].tolist() == out["new_ids"]


@pytest.fixture(scope="module")
def dense(shards, tmp_path_factory):
    return train_tiny(shards, tmp_path_factory.mktemp("dense") / "run", model__attention="dense", model__fam_len=0,
                      train__steps=1, optim__warmup_steps=1)


def test_bad_input_is_one_line_each(trained, dense, tmp_path, capsys):
    corrupt = copy_step(trained, tmp_path / "corrupt" / trained.name)
    data = bytearray((corrupt / "model_tp00.pt").read_bytes())
    data[-100] ^= 0xFF
    (corrupt / "model_tp00.pt").write_bytes(bytes(data))
    other = copy_step(trained, tmp_path / "other" / trained.name)
    edit_model_config(other, num_layers=3)  # a complete checkpoint whose config names a deeper model
    long_prompt = "x" * 65  # the dense run's data.seq_len is 64
    cases = [
        (["--checkpoint", tmp_path / "nowhere"], r"checkpoint \S*nowhere: no such file or folder"),
        (["--checkpoint", corrupt], r"model_tp00.pt does not match its sha256 in manifest.json \(corrupt\)"),
        (["--checkpoint", other], r"its weights are not the model its config.yaml describes "
                                  r"\(another architecture\?\): "
                                  r"missing \['layers.2.attention.linear_proj.weight'"),
        (["--checkpoint", trained, "--tokenizer", "bpe-32k"],
         "tokenizer 'bpe-32k' is neither 'byte' nor an existing file"),
        (["--checkpoint", dense, "--prompt", long_prompt], r"prompt: 65 tokens, over --max-prompt-tokens=64 \(dense "
                                                            r"attention keeps every token's keys and values"),
        (["--checkpoint", trained, "--temperature", "0", "--top-k", "5"],
         "top_k / top_p have no effect with temperature=0"),
    ]
    argvs = [[*argv, *([] if "--prompt" in argv else ["--prompt", "def "]), "--max-new-tokens", "3"] for argv, _ in cases]
    results = run_cases([("pipeline.generate", argv) for argv in argvs], capsys)
    for (_, message), result in zip(cases, results):
        line = one_line_error(result, "pipeline.generate")
        assert re.search(message, line), (message, line)


def test_dense_prompt_within_the_limit_generates(dense):
    out = generate_main(["--checkpoint", str(dense), "--prompt", "x" * 64, "--max-new-tokens", "4"])
    assert len(out["new_ids"]) <= 4 and json.dumps(out)


def test_cli_stops_at_the_end_of_document_token(trained):
    """Sampled hot (temperature 3), the byte model draws the end-of-document byte 0 now and then: the
    first seed whose uncut continuation holds it within 150 tokens (found with model.generation, no stop token) must
    end the CLI's output right after it, and the text must not show it."""
    model, prompt = model_from_shard_file(trained), torch.tensor([list(PROMPT.encode())])
    for seed in range(100):  # a stop well before the end, so that a CLI ignoring it gives more tokens
        free = generate(model, prompt, 200, Sampling(3.0), generator=torch.Generator().manual_seed(seed)).tokens[0]
        if (free[:150] == 0).any():
            break
    else:
        pytest.fail("no seed in 100 drew the end-of-document byte in 150 tokens: raise the temperature")
    stop = int((free == 0).nonzero()[0])
    out = generate_main(["--checkpoint", str(trained), "--prompt", PROMPT, "--max-new-tokens", "200",
                         "--temperature", "3", "--seed", str(seed)])
    assert out["new_ids"] == free[: stop + 1].tolist() and out["new_ids"][-1] == 0
    assert out["text"] == bytes(out["new_ids"][:-1]).decode("utf-8", errors="replace")
