"""`python -m data_prep.passkey`: synthetic PassKey training samples as token shards.

    python -m data_prep.passkey --tokenizer byte --seq-len 1024 --samples 32768 --output data/passkey-byte-1024

Each sample is one PassKey document of exactly seq_len tokens plus its end-of-document token
(seq_len + 1, one whole sample: never cut or packed with another document): the evaluation's
prompt (pipeline/evaluation/passkey.py, the same pieces and ids) followed by the answer
" <key>.". Mixed into training with data.train_blend, the usual language-model loss on every
token includes the answer digits, which only the key's first mention predicts.

Per sample i (generator seeded by (seed, i)): a random 5-digit key and a depth drawn uniformly
from [--min-depth, --max-depth] (0: key right after the task sentence, as in the paper's prompt;
1: right before the question). With a fixed sample length, the depth sets how far the key sits
from the question: uniform depths put keys both inside BSWA's receptive field (layers x (m+1) x
C tokens) and far beyond it.

Output `DIR/train/`: tar shards and manifest.json in data_prep.shard's format (doc_lengths.npy
included), so the training loader and `python -m data_prep.validate` read it as any other split.
The bytes are a pure function of the arguments; shards are renamed into place and the manifest is
written last, atomically, so an interrupted run is simply run again.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from data_prep.cli import run_main
from data_prep.manifest import MANIFEST_NAME, build_manifest, write_lengths, write_manifest
from data_prep.pack import sample_key, shard_name, write_shard
from data_prep.tokenizer import token_dtype
from pipeline.evaluation.codec import load_codec
from pipeline.evaluation.passkey import PassKeyText, below_fixed_part, build_prompt

SPLIT = "train"
_SAMPLE_STREAM = 0x50534B  # keeps these draws apart from the evaluation's key draws
_PROBE_KEYS = ("10000", "11111", "12345", "55555", "99999", "98765")


def passkey_document(text: PassKeyText, seq_len: int, seed: int, index: int, min_depth: float,
                     max_depth: float) -> tuple[np.ndarray, str, float]:
    """(ids [seq_len], key, depth) of sample `index`: the prompt plus the answer."""
    rng = np.random.default_rng([seed, index, _SAMPLE_STREAM])
    key = str(rng.integers(10_000, 100_000))
    depth = float(rng.uniform(min_depth, max_depth))
    answer = text.answer(key)
    if seq_len - len(answer) < text.fixed_length(key):
        raise ValueError(below_fixed_part(text, seq_len, key, len(answer), ", answer") + " (--seq-len)")
    prompt = build_prompt(text, seq_len - len(answer), depth, key)
    return np.asarray(prompt.ids + answer, dtype=np.int64), key, depth


def write_passkey_shards(tokenizer: str, seq_len: int, samples: int, output: str, seed: int = 0,
                         samples_per_shard: int = 256, min_depth: float = 0.0, max_depth: float = 1.0) -> str:
    """Write the shards and the manifest; returns the manifest's path."""
    _check(seq_len, samples, samples_per_shard, min_depth, max_depth)
    codec = load_codec(tokenizer)
    text = PassKeyText(codec)
    for key in _PROBE_KEYS:  # fail before writing anything, not at the first unlucky sample
        answer = text.answer(key)
        if seq_len - len(answer) < text.fixed_length(key):
            raise ValueError(below_fixed_part(text, seq_len, key, len(answer), ", answer") + " (--seq-len)")
    folder = os.path.join(output, SPLIT)
    os.makedirs(folder, exist_ok=True)
    dtype = token_dtype(codec.vocab_size)
    shards = []
    for index, start in enumerate(range(0, samples, samples_per_shard)):
        rows = np.stack([_sample(text, seq_len, seed, i, min_depth, max_depth, codec.eod_id)
                         for i in range(start, min(start + samples_per_shard, samples))]).astype(dtype)
        keys = [sample_key(SPLIT, 0, index, r) for r in range(len(rows))]
        shards.append(write_shard(os.path.join(folder, shard_name(SPLIT, 0, index)), keys, rows))
    lengths = write_lengths(os.path.join(folder, "doc_lengths.npy"), [np.full(samples, seq_len)], samples)
    settings = {"generator": "data_prep.passkey", "tokenizer": tokenizer, "seq_len": seq_len, "samples": samples,
                "seed": seed, "samples_per_shard": samples_per_shard, "min_depth": min_depth, "max_depth": max_depth}
    manifest = build_manifest(SPLIT, seq_len, dtype.name, codec.tokenizer.describe(), shards, documents=samples,
                              dropped_tokens=0, sources=[], settings=settings, doc_lengths=lengths,
                              skipped_documents={"bad_utf8": 0, "bad_json": 0})
    path = os.path.join(folder, MANIFEST_NAME)
    write_manifest(path, manifest)
    return path


def _sample(text: PassKeyText, seq_len: int, seed: int, index: int, min_depth: float, max_depth: float,
            eod_id: int) -> np.ndarray:
    ids, _, _ = passkey_document(text, seq_len, seed, index, min_depth, max_depth)
    return np.append(ids, eod_id)


def _check(seq_len: int, samples: int, samples_per_shard: int, min_depth: float, max_depth: float) -> None:
    for name, value in (("--seq-len", seq_len), ("--samples", samples), ("--samples-per-shard", samples_per_shard)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")
    if not 0.0 <= min_depth <= max_depth <= 1.0:
        raise ValueError(f"--min-depth={min_depth} --max-depth={max_depth}: need 0 <= min <= max <= 1")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.passkey", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="'byte', a HF tokenizer.json or a SentencePiece .model")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence (samples hold seq_len+1)")
    p.add_argument("--samples", type=int, required=True, help="PassKey samples to write")
    p.add_argument("--output", required=True, help="output folder (gets train/)")
    p.add_argument("--seed", type=int, default=0, help="seed of keys and depths")
    p.add_argument("--samples-per-shard", type=int, default=256, help="samples per tar shard")
    p.add_argument("--min-depth", type=float, default=0.0, help="smallest key depth fraction (0: key first)")
    p.add_argument("--max-depth", type=float, default=1.0, help="largest key depth fraction (1: key last)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    path = write_passkey_shards(args.tokenizer, args.seq_len, args.samples, args.output, args.seed,
                                args.samples_per_shard, args.min_depth, args.max_depth)
    print(f"wrote {args.samples} PassKey samples of {args.seq_len + 1} tokens: {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_main(main, prog="python -m data_prep.passkey"))
