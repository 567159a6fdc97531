"""`python -m data_prep.train_tokenizer`: train a byte-level BPE tokenizer.json.

    python -m data_prep.train_tokenizer --input stdlib --vocab-size 4096 --output tok.json
    python -m data_prep.shard --input stdlib --tokenizer tok.json --seq-len 512 --output DIR

Inputs are read exactly as `data_prep.shard` reads them (same --input, --text-field),
and only documents of the *train* split (same --valid-fraction) are used, so the
validation documents stay unseen by the tokenizer too. Bad documents are handled as
the sharder handles them (`--on-bad-utf8`, `--on-bad-json`: error or skip; skips are
counted on stderr). The BPE is byte-level (GPT-2 style: every byte is in the initial
alphabet, so any text encodes without unknowns) and reserves `<|endoftext|>` as id 0,
the end-of-document token the packer appends.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterator

from data_prep import corpus
from data_prep.cli import run_main
from data_prep.readers import BadDocuments
from data_prep.shard import DEFAULT_VALID_FRACTION, add_bad_input_options, report_skipped
from data_prep.tokenizer import HF_EOD_TOKENS

EOD_TOKEN = HF_EOD_TOKENS[0]
_MIN_VOCAB = 256 + 1  # the byte alphabet plus EOD


def train_documents(input_spec: str, text_field: str, valid_fraction: float,
                    bad: BadDocuments | None = None) -> Iterator[str]:
    """The train split's texts; `bad` decides about bad documents and counts the skipped ones."""
    for source in corpus.list_sources(input_spec):
        for doc_id, text in corpus.iter_documents(source, text_field, bad=bad):
            if corpus.split_of(doc_id, valid_fraction) == "train":
                yield text


def train_bpe(texts: Iterator[str], vocab_size: int, output: str, progress: bool = True) -> None:
    """Train a byte-level BPE on `texts` and save it as a HF tokenizer.json at `output`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"--vocab-size must be at least {_MIN_VOCAB} (256 bytes + {EOD_TOKEN}), "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(output)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.train_tokenizer",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="input files, a folder or glob of them, or 'stdlib' (as for data_prep.shard)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--valid-fraction", type=float, default=DEFAULT_VALID_FRACTION,
                   help="documents held out as in data_prep.shard, not trained on "
                   f"(default: {DEFAULT_VALID_FRACTION})")
    p.add_argument("--vocab-size", type=int, required=True,
                   help=f"vocabulary size including {EOD_TOKEN} (at least {_MIN_VOCAB})")
    p.add_argument("--output", required=True, help="where to write tokenizer.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_bad_input_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Train and save; returns the skipped-document counts per split."""
    args = parse_args(argv)
    bad = BadDocuments(args.on_bad_utf8, args.on_bad_json,
                       split_of=lambda doc_id: corpus.split_of(doc_id, args.valid_fraction))
    texts = train_documents(args.input, args.text_field, args.valid_fraction, bad)
    train_bpe(texts, args.vocab_size, args.output, progress=not args.no_progress)
    for where in bad.locations:
        print(f"warning: skipped {where}", file=sys.stderr)
    counts = {split: bad.of(split) for split in corpus.SPLITS}
    report_skipped(counts)
    return counts


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m data_prep.train_tokenizer"))
