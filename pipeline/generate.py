"""`python -m pipeline.generate`: text from a trained checkpoint, streamed with O(1) state.

    python -m pipeline.generate --checkpoint runs/demo/checkpoints --prompt "def main(" --max-new-tokens 64
    python -m pipeline.generate --checkpoint DIR --prompt-file prompt.txt --max-new-tokens 200 \
        --temperature 0.8 --top-k 40 --top-p 0.95 --seed 0 [--device auto] [--tokenizer SPEC] [--json]

The checkpoint (any training layout, pipeline/checkpointing/whole_model.py) becomes one TP=1 model
in this process; the prompt is encoded with the run's tokenizer (byte, tokenizer.json or
SentencePiece), prefilled in micro-chunks of `--prefill-chunk-blocks` blocks and decoded one token
at a time by model/generation (FAM and BSWA keep a fixed-size state per layer). Generation stops
at the end-of-document token or after --max-new-tokens. Greedy unless --temperature > 0.
Dense attention keeps every token's K/V, so its prompt is refused past --max-prompt-tokens
(default: the run's data.seq_len); for FAM/BSWA the limit applies only when given.
Prints the generated text (stdout), or with --json the prompt ids, new ids and text.
Bad input ends in one line on stderr, exit 2 (data_prep/cli.py run_main).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_prep.cli import run_main

PROG = "python -m pipeline.generate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a step_XXXXXXXX folder, a checkpoint folder (newest) or a run folder")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="file holding the prompt text (UTF-8)")
    p.add_argument("--max-new-tokens", type=int, required=True, help="tokens generated at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of probability p")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="refuse longer prompts (default: the run's data.seq_len for dense attention, none otherwise)")
    p.add_argument("--prefill-chunk-blocks", type=int, default=8, help="blocks per prefill forward call")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 autocast on GPU")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec; default: the run's (its training manifest's)")
    p.add_argument("--json", action="store_true", help="print {prompt_ids, new_ids, text} as JSON")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return p


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompt-file {path}: not UTF-8 text (byte {err.start})") from None


def prompt_limit(args: argparse.Namespace, model_args, config: dict) -> int | None:
    """--max-prompt-tokens, or for dense attention the run's training length."""
    if args.max_prompt_tokens is not None:
        return args.max_prompt_tokens
    if model_args.attention == "dense":
        return int((config.get("data") or {}).get("seq_len") or 0) or None
    return None


def check_prompt_length(n_tokens: int, limit: int | None, attention: str) -> None:
    if limit is None or n_tokens <= limit:
        return
    why = ("dense attention keeps every token's keys and values, so memory grows with the prompt"
           if attention == "dense" else "the limit given")
    raise ValueError(f"prompt: {n_tokens} tokens, over --max-prompt-tokens={limit} ({why}); shorten the prompt or "
                     "raise --max-prompt-tokens")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv, prog=PROG)


def _main(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens}: must be >= 0")
    from model.generation import Sampling, generate
    from pipeline.checkpointing.whole_model import build_whole_model, read_whole_checkpoint
    from pipeline.parallel.groups import select_device
    from pipeline.evaluation.codec import load_codec

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    sampling.validate()
    text = read_prompt(args)
    whole = read_whole_checkpoint(args.checkpoint, args.tokenizer)
    codec = load_codec(whole.tokenizer)
    ids = codec.encode(text)
    check_prompt_length(len(ids), prompt_limit(args, whole.args, whole.config), whole.args.attention)
    try:
        device = select_device(args.device)
    except ValueError:
        raise ValueError(f"--device {args.device}: torch sees no CUDA device; use --device cpu or auto") from None
    model = build_whole_model(whole.state, whole.args, device)
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        out = generate(model, torch.tensor([ids], dtype=torch.long), args.max_new_tokens, sampling,
                       stop_tokens=[codec.eod_id], generator=torch.Generator().manual_seed(args.seed),
                       prefill_chunk_blocks=args.prefill_chunk_blocks)
    new = out.tokens[0, : int(out.lengths[0])].tolist()
    result = {"checkpoint": str(whole.path), "step": whole.step, "prompt_ids": ids, "new_ids": new,
              "text": codec.decode(new)}
    print(json.dumps(result) if args.json else result["text"])
    return result


if __name__ == "__main__":
    sys.exit(main())
