"""`python -m pipeline.export_hf`: a training checkpoint as a Hugging Face transformers folder.

    python -m pipeline.export_hf --checkpoint runs/demo/checkpoints --output out/hf [--force] [--dtype bf16]

Any training layout (TP shards, PP stages, ZeRO-1/2/3) is first read as one TP=1 state dict by
pipeline/checkpointing/whole_model.py (verified against its sha256 manifest), then written by
pipeline/hf/folder.py: weights in `--dtype` (default fp32, as trained), config.json, the remote
code, the run's tokenizer with its end-of-document token as eos and pad, famtron_export.json.
Then `AutoModelForCausalLM.from_pretrained(out/hf, trust_remote_code=True)` loads it.
An output folder that exists is refused unless --force (it is then replaced whole, atomically).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data_prep.cli import run_main

PROG = "python -m pipeline.export_hf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a step_XXXXXXXX folder, a checkpoint folder (newest) or a run folder")
    p.add_argument("--output", required=True, help="the Hugging Face folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the exported weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec; default: the run's (its training manifest's)")
    p.add_argument("--max-shard-gib", type=float, default=5.0, help="split model.safetensors past this size")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv, prog=PROG)


def _main(argv: list[str]) -> Path:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.force:  # before the (possibly long) read of the checkpoint
        raise FileExistsError(f"--output {output}: already exists; choose a new folder or pass --force to replace it")
    from pipeline.checkpointing.whole_model import read_whole_checkpoint
    from pipeline.hf.folder import export_hf

    whole = read_whole_checkpoint(args.checkpoint, args.tokenizer)
    state = {k: v.to(DTYPES[args.dtype]) for k, v in whole.state.items()}
    export_hf(state, whole.args, output, tokenizer=whole.tokenizer, force=args.force,
              max_shard_bytes=int(args.max_shard_gib * 2**30))
    print(f"exported {whole.path} (step {whole.step}, {args.dtype}, tokenizer {whole.tokenizer}) to {output}")
    return output


if __name__ == "__main__":
    sys.exit(main())
