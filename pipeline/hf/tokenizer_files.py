"""The tokenizer files of an export, loadable by transformers' AutoTokenizer, EOD as eos and pad.

famtron's three tokenizers (data_prep/tokenizer.py) become:
    byte           tokenizer.json built here: 256 tokens "<0x00>".."<0xFF>" whose ids are the
                   UTF-8 bytes (BPE without merges, byte fallback), "<0x00>" (NUL, famtron's
                   byte EOD) a special token;
    tokenizer.json copied verbatim; eos = its end-of-document token (data_prep's choice);
    SentencePiece  copied verbatim as tokenizer.model, read by transformers' SentencePieceBackend
                   (the same ids as sentencepiece itself); eos = the model's eos piece.
plus tokenizer_config.json. config.json records which one ships (`famtron_tokenizer`), so an
import can hand the same tokenizer back.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.tokenizer import BYTE_SPEC, load_tokenizer

TOKENIZER_KEY = "famtron_tokenizer"


def byte_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken("<0x00>", special=True, normalized=False)])
    return tok.to_str(pretty=True)


def _eod_string(spec: str, eod_id: int) -> str:
    if spec == BYTE_SPEC:
        return "<0x00>"
    if spec.endswith(".json"):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(spec).id_to_token(eod_id)
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=spec).id_to_piece(eod_id)


def tokenizer_files(spec: str, model_vocab_size: int) -> tuple[dict[str, bytes], dict]:
    """(files {name: bytes}, config.json entries) for the tokenizer `spec` ('byte', a
    tokenizer.json or a SentencePiece .model). The tokenizer's ids must fit the model's vocabulary."""
    tok = load_tokenizer(spec)
    if tok.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer {spec!r} has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model_vocab_size}: export with the tokenizer the model was trained with")
    eod = _eod_string(spec, tok.eod_id)
    if spec == BYTE_SPEC:
        name, content, cls = "tokenizer.json", byte_tokenizer_json().encode(), "PreTrainedTokenizerFast"
    elif spec.endswith(".json"):
        name, content, cls = "tokenizer.json", Path(spec).read_bytes(), "PreTrainedTokenizerFast"
    else:
        name, content, cls = "tokenizer.model", Path(spec).read_bytes(), "SentencePieceBackend"
    config = {"tokenizer_class": cls, "eos_token": eod, "pad_token": eod, "clean_up_tokenization_spaces": False}
    files = {name: content, "tokenizer_config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    shipped = BYTE_SPEC if spec == BYTE_SPEC else name
    entries = {"eos_token_id": tok.eod_id, "pad_token_id": tok.eod_id, TOKENIZER_KEY: shipped}
    return files, entries


def tokenizer_spec_in(folder: Path, config: dict) -> str:
    """The spec of the tokenizer an export ships (for load_tokenizer, or a re-export)."""
    shipped = config.get(TOKENIZER_KEY)
    if shipped == BYTE_SPEC:
        return BYTE_SPEC
    if shipped not in ("tokenizer.json", "tokenizer.model"):
        raise ValueError(f"{folder / 'config.json'}: {TOKENIZER_KEY}={shipped!r}, expected 'byte', "
                         "'tokenizer.json' or 'tokenizer.model'")
    if not (folder / shipped).is_file():
        raise ValueError(f"{folder / shipped}: missing (config.json says the tokenizer ships in it)")
    return str(folder / shipped)
