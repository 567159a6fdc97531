"""Tokenizers behind one small interface, chosen by a spec string.

    tok = load_tokenizer("byte")                 # 256 ids, ids are the UTF-8 bytes
    tok = load_tokenizer("path/to/tokenizer.json")  # HF `tokenizers`
    tok = load_tokenizer("path/to/sp.model")        # SentencePiece

Every tokenizer has `encode(text) -> list[int]`, `encode_batch(texts)`, `vocab_size`,
`eod_id` (the end-of-document id appended after each document when packing) and
`name`. `encode_stream(texts)` is what the sharder uses: one numpy array holding every
document's ids, each followed by EOD, and the documents' lengths. Building it in numpy
(and, for HF, with `encode_batch_fast`, which skips offsets) keeps per-token Python work
out of the hot path; it runs in the tokenization workers (`data_prep.encode`).

Byte tokenizer and end-of-document: the vocabulary must stay exactly 256 so the `tiny`
model (vocab_size=256) can consume it, so there is no spare id for EOD. Byte 0 (NUL)
is used as EOD: it never occurs in source code or ordinary text. NUL bytes inside a
document are removed when encoding, because they would otherwise read as a document
boundary.

Special tokens in text are text: the EOD id must only ever come from the packer's
separator, or any web page containing `<|endoftext|>` would forge document boundaries.
- HF: the tokenizer is loaded with `encode_special_tokens = True`, so added special
  tokens written in a document are split like any other text (both encode paths). At
  load, the EOD token's own text is encoded once; a tokenizer that still maps it to the
  EOD id (say a WordLevel vocabulary that holds it as a plain word) is refused.
- SentencePiece: control symbols (`</s>`, `<s>`, ...) are never matched in input text,
  only user-defined symbols are, and a model whose eos piece is not a control symbol
  reports eos_id -1, which is refused. So the eos id cannot come from text.
- `encode_stream` checks its output anyway (one vectorised count): a document whose ids
  contain EOD raises `EODInTextError` with its index in the batch, which the sharder turns
  into an error naming the document's file and line.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from data_prep.manifest import sha256_file

BYTE_SPEC = "byte"
# Special tokens recognised as end-of-document in a HF tokenizer.json, in order of
# preference. `train_tokenizer` writes the first one.
HF_EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|eod|>", "[EOS]")


class EODInTextError(ValueError):
    """The `index`-th text of a batch encoded to the EOD id (pickles through a worker pool)."""

    def __init__(self, index: int, message: str):
        super().__init__(index, message)
        self.index, self.message = index, message

    def __str__(self) -> str:
        return self.message


class Tokenizer:
    """Common interface; subclasses implement `encode_batch` (or `encode_array`)."""

    name: str
    spec: str
    vocab_size: int
    eod_id: int
    # Encoding costs less than sending the text to a worker process: encode inline.
    cheap: bool = False

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_array(self, text: str) -> np.ndarray:
        return self.encode_arrays([text])[0]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Batch encode to numpy arrays (lets HF tokenizers use all cores)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def encode_stream(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of every document each followed by EOD [n_tokens + n_docs], lengths [n_docs])."""
        return self._with_eod(self.encode_batch(texts))

    def _with_eod(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        stream, lengths = _with_eod(ids, self.eod_id, token_dtype(self.vocab_size))
        if np.count_nonzero(stream == self.eod_id) != len(ids):
            index = next(i for i, doc in enumerate(ids) if self.eod_id in doc)
            raise EODInTextError(index, f"tokenizer {self.spec} encoded text of this document to its "
                                 f"end-of-document id {self.eod_id}: it would forge a document boundary; "
                                 "use a tokenizer whose end-of-document token is only a special token")
        return stream, lengths

    def fingerprint(self) -> str:
        """sha256 of the tokenizer file ('' for byte): ties shards to the exact vocabulary."""
        return ""

    def describe(self) -> dict:
        """What the manifest records about the tokenizer."""
        return {"spec": self.spec, "name": self.name, "vocab_size": self.vocab_size,
                "eod_id": self.eod_id, "sha256": self.fingerprint()}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; byte 0 (NUL) doubles as end-of-document."""

    name = "byte"
    spec = BYTE_SPEC
    vocab_size = 256
    eod_id = 0
    cheap = True

    def encode_array(self, text: str) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return ids[ids != self.eod_id]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode_array(t).tolist() for t in texts]

    def encode_stream(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # One join and one encode for the whole batch; the NUL separators are the EODs.
        joined = "\0".join(t.replace("\0", "") for t in texts) + "\0"
        stream = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
        ends = np.flatnonzero(stream == self.eod_id)
        lengths = np.diff(ends, prepend=-1) - 1
        return stream.astype(np.uint16), lengths.astype(np.uint32)


class HFTokenizer(Tokenizer):
    """A HF `tokenizers` tokenizer.json; EOD is the first of HF_EOD_TOKENS it defines."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer

        self.spec = path
        self.name = f"hf:{os.path.basename(path)}"
        self._tok = _HFTokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for token in HF_EOD_TOKENS:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                self.eod_id, self.eod_token = token_id, token
                break
        else:
            raise ValueError(f"tokenizer {path} has none of the end-of-document tokens "
                             f"{list(HF_EOD_TOKENS)}; add one (python -m data_prep.train_tokenizer "
                             f"adds {HF_EOD_TOKENS[0]!r})")
        # Special tokens written in a document are split as text (see the module docstring).
        self._tok.encode_special_tokens = True
        if self.eod_id in self.encode(self.eod_token):
            raise ValueError(f"tokenizer {path} encodes the text {self.eod_token!r} to its end-of-document id "
                             f"{self.eod_id} even with special-token parsing off (it is a plain vocabulary "
                             "entry or a non-special added token): documents containing it would forge "
                             "boundaries; make it a special token only")

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        # add_special_tokens=False: the packer adds EOD itself, nothing else (no BOS template).
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_stream(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # encode_batch_fast (tokenizers >= 0.20) does not compute character offsets,
        # which we never use; the ids are the same.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return self._with_eod([e.ids for e in encode(texts, add_special_tokens=False)])

    def fingerprint(self) -> str:
        return sha256_file(self.spec)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model; EOD is the model's eos id."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.spec = path
        self.name = f"sentencepiece:{os.path.basename(path)}"
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise ValueError(f"SentencePiece model {path} has no eos piece (eos_id=-1); "
                             "train it with eos_id set to use it for pretraining")

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def fingerprint(self) -> str:
        return sha256_file(self.spec)


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte', a HF tokenizer.json path, or a SentencePiece .model path."""
    if spec == BYTE_SPEC:
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise ValueError(f"tokenizer {spec!r} is neither 'byte' nor an existing file "
                         "(a HF tokenizer.json or a SentencePiece .model)")
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise ValueError(f"tokenizer file {spec!r}: expected a .json (HF tokenizers) "
                     "or .model (SentencePiece) file")


def _with_eod(ids: list[list[int]], eod_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lengths + 1)  # one past each document's EOD
    stream = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    stream[ends - 1] = eod_id
    for start, doc in zip(ends - lengths - 1, ids):
        stream[start:start + len(doc)] = doc
    return stream, lengths.astype(np.uint32)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id 0..vocab_size-1: uint16, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)

