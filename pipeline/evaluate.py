"""`python -m pipeline.evaluate`: PassKey retrieval and loss by position of a trained checkpoint.

    python -m pipeline.evaluate passkey --checkpoint DIR --lengths 1024 4096 16384 --depths 0 0.5 1 \
        --trials 20 [--batch 20] [--device auto] [--output DIR]
    python -m pipeline.evaluate position-loss --checkpoint DIR --data VALID/manifest.json --length 65536 \
        [--buckets 32] [--sequences 4] [--device auto] [--output DIR]

passkey: greedy answers to PassKey prompts of each length (tokens) with the key at each depth
(0 = the FAM paper's key-first prompt), exact match of the key (pipeline/evaluation/passkey.py);
writes passkey.json (accuracy per length and depth) and passkey_heatmap.png. position-loss: mean
token loss per position bucket over held-out sequences, streamed chunk by chunk with the state
carried; writes position_loss.json and position_loss.png (BSWA's receptive field marked).
Prompts and sequences are streamed through the model (model/generation), so lengths far beyond
the training length fit in O(1) memory for FAM and BSWA.

The checkpoint (any training layout) is loaded as one whole TP=1 model by
`load_whole_model`; the commands themselves are functions of a model (`passkey_command`,
`position_loss_command`), tested directly. Bad input ends in one line (exit 2): lengths below the
prompt's fixed part, an unknown tokenizer, a depth outside [0, 1], too little held-out data.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from data_prep.cli import run_main
from pipeline.evaluation.codec import load_codec
from pipeline.evaluation.passkey_eval import PassKeySettings, run_passkey
from pipeline.evaluation.position_loss import bucket_edges, held_out_sequences, run_position_loss
from pipeline.evaluation.reports import write_passkey, write_position_loss

PROG = "python -m pipeline.evaluate"


def passkey_command(model, tokenizer_spec: str, settings: PassKeySettings, output: Path, title: str = "",
                    autocast=contextlib.nullcontext) -> dict:
    """PassKey over the settings' grid -> results (also passkey.json and the heat map in `output`)."""
    results = run_passkey(model, load_codec(tokenizer_spec), settings, autocast=autocast)
    results["model"] = _describe(model)
    write_passkey(results, output, title)
    return results


# shape: one keyword per command-line option of `python -m pipeline.evaluate position-loss`
def position_loss_command(model, data: str, length: int, output: Path, buckets: int = 32, spacing: str = "log",
                          sequences: int = 4, chunk_tokens: int = 1024, batch_size: int = 4, title: str = "",
                          autocast=contextlib.nullcontext) -> dict:
    """Loss by position over `sequences` held-out sequences of `length` tokens from manifest `data`."""
    edges = bucket_edges(length, buckets, spacing)
    seqs = held_out_sequences(data, length, sequences, vocab_size=model.config.vocab_size)
    result = run_position_loss(model, seqs, edges, chunk_tokens, batch_size, autocast)
    result["data"], result["model"] = data, _describe(model)
    write_position_loss(result, output, title or "model", f"{title}: loss by position" if title else "")
    return result


def _describe(model) -> dict:
    c = model.config
    return {"attention": c.attention, "num_layers": c.num_layers, "hidden_size": c.hidden_size,
            "block_size": c.block_size, "mem_blocks": c.mem_blocks, "fam_len": c.fam_len, "vocab_size": c.vocab_size}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pk = commands.add_parser("passkey", help="PassKey retrieval accuracy per length and depth")
    _common(pk)
    pk.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    pk.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="key depth fractions in [0, 1]; 0 is the paper's key-first prompt")
    pk.add_argument("--trials", type=int, default=20, help="prompts (keys) per length and depth")
    pk.add_argument("--batch", type=int, default=None, help="prompts generated together (default: --trials)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the keys")
    pl = commands.add_parser("position-loss", help="mean loss per position bucket over held-out sequences")
    _common(pl)
    pl.add_argument("--data", required=True, help="manifest.json of held-out shards (same tokenizer)")
    pl.add_argument("--length", type=int, required=True, help="tokens per sequence")
    pl.add_argument("--buckets", type=int, default=32, help="position buckets (at most)")
    pl.add_argument("--spacing", choices=("log", "linear"), default="log", help="bucket widths")
    pl.add_argument("--sequences", type=int, default=4, help="held-out sequences averaged")
    pl.add_argument("--batch", type=int, default=4, help="sequences streamed together")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint step folder (runs/x/checkpoints/step_...)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 autocast on GPU")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec; default: the checkpoint's")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tokens per forward call while streaming (a multiple of the block size; default 16 blocks)")
    p.add_argument("--output", default=None, help="folder for the JSON and PNG (default: eval/<checkpoint name>)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv, prog=PROG)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.parallel.groups import select_device

    device = select_device(args.device)
    model, model_args, spec = _load(args.checkpoint, device, args.tokenizer)
    chunk = args.chunk_tokens or 16 * model_args.block_size
    output = Path(args.output or Path("eval") / Path(args.checkpoint).name)
    use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    title = f"{Path(args.checkpoint).name}"
    if args.command == "passkey":
        settings = PassKeySettings(args.lengths, args.depths, args.trials, args.seed, args.batch or args.trials, chunk)
        results = passkey_command(model, spec, settings, output, title, autocast)
        for cell in results["cells"]:
            print(f"length {cell['length']:>8}  depth {cell['depth']:4.2f}  accuracy {cell['accuracy']:.2f}")
    else:
        result = position_loss_command(model, args.data, args.length, output, args.buckets, args.spacing,
                                       args.sequences, chunk, args.batch, title, autocast)
        for b in result["buckets"]:
            print(f"positions {b['start']:>8}-{b['end']:<8}  loss {b['loss']:.4f}")
    print(f"results in {output}")
    return 0


def _load(checkpoint: str, device: torch.device, tokenizer: str | None):
    """(TP=1 whole model, its ModelArgs, tokenizer spec) from a checkpoint of any layout; `tokenizer`
    replaces the run's (needed when its training manifest is gone)."""
    from pipeline.checkpointing.whole_model import load_whole_model

    return load_whole_model(checkpoint, device, tokenizer)


if __name__ == "__main__":
    sys.exit(main())
