"""Text in and out of token ids for evaluation: data_prep's tokenizers plus a decoder.

    codec = load_codec("byte")              # or a HF tokenizer.json, or a SentencePiece .model
    codec.encode(" The pass key is")        # list[int], no special tokens added
    codec.decode(ids)                       # text of generated ids (end-of-document dropped)

Encoding is data_prep/tokenizer.py's (the ids the shards hold), so a prompt built here is
tokenized exactly as training data built from the same pieces. Decoding exists only to read
a generated answer; it is loaded from the same spec: bytes as UTF-8 (invalid bytes replaced),
HF tokenizers' decoder, SentencePiece's decode. An unknown spec fails in `load_tokenizer` with
one line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from data_prep.tokenizer import BYTE_SPEC, Tokenizer, load_tokenizer


@dataclass
class Codec:
    tokenizer: Tokenizer
    _decode: Callable[[list[int]], str]

    @property
    def spec(self) -> str:
        return self.tokenizer.spec

    @property
    def eod_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self._decode([int(i) for i in ids if int(i) != self.eod_id])


def load_codec(spec: str) -> Codec:
    """'byte', a HF tokenizer.json or a SentencePiece .model (data_prep.tokenizer.load_tokenizer)."""
    tokenizer = load_tokenizer(spec)
    if spec == BYTE_SPEC:
        return Codec(tokenizer, _decode_bytes)
    if spec.endswith(".json"):
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(spec)
        return Codec(tokenizer, lambda ids: hf.decode(ids, skip_special_tokens=True))
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spec)
    return Codec(tokenizer, lambda ids: sp.decode(ids))


def _decode_bytes(ids: list[int]) -> str:
    """UTF-8 of byte ids; an id past 255 (a model whose vocabulary is larger than the
    tokenizer's can generate one) reads as U+FFFD, like an invalid byte."""
    parts, run = [], bytearray()
    for i in ids:
        if i < 256:
            run.append(i)
            continue
        parts += [run.decode("utf-8", errors="replace"), "\ufffd"]
        run = bytearray()
    return "".join(parts) + run.decode("utf-8", errors="replace")
