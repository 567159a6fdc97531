"""PassKey prompts and their scoring (issue 15 item 2): pure functions of a tokenizer and a seed.

The prompt is the one of Landmark attention and LongLoRA (shared/research/eval-and-export.md §2)
with the key at a depth fraction of the filler:

    TASK  filler[:k]  KEY_LINE(key)  filler[k:]  QUESTION            -> the model answers " <key>"

Depth 0 puts the whole filler after the key line: that is the FAM paper's prompt (arXiv
2404.09173 Fig. 10: key first, no prefix filler). The filler is FILLER_SENTENCES repeated; k is
the sentence boundary nearest to depth x filler length, so the key line never splits a
sentence. A prompt has exactly `length` tokens: the filler is cut (at its end) to what the
fixed part (task, key line, question) leaves. Pieces (task, each filler sentence, the key line,
the question) are tokenized separately and their ids concatenated, so lengths are exact in
tokens and a training document built here (data_prep/passkey.py: the prompt plus ANSWER) is
tokenized exactly like the evaluation prompt. Every piece but the first starts with a space:
byte-level BPE splits words at spaces anyway, and SentencePiece's dummy prefix then stands for
that space instead of adding one.

Keys are random 5-digit numbers, drawn per (seed, length, trial): every depth of one length
sees the same keys, so depths differ only in where the key sits. Scoring is exact match of the
first integer in the generated text (Landmark's parsing), plus the count of key digits in place
(partial credit, for learning curves only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.codec import Codec

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER_SENTENCES = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
                    " There and back again.")
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
KEY_INTRO = " The pass key is"  # the key line up to the key: where the key starts
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}."
KEY_DIGITS = 5
_KEY_STREAM = 0x504B  # keeps key draws apart from any other use of the seed


@dataclass(frozen=True)
class PassKeyPrompt:
    ids: list[int]  # exactly the requested length
    key: str  # five digits
    key_start: int  # index in ids of the first token of the key's first mention (after KEY_INTRO's tokens)
    filler_before: int  # filler tokens between the task sentence and the key line
    filler_after: int  # filler tokens between the key line and the question
    answer_ids: list[int]  # " <key>." as the model should continue


class PassKeyText:
    """The prompt's pieces as token ids under one tokenizer (encoded once)."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.task = codec.encode(TASK)
        self.question = codec.encode(QUESTION)
        self.intro = codec.encode(KEY_INTRO)
        self.sentences = [codec.encode(t) for t in FILLER_SENTENCES]

    def key_line(self, key: str) -> list[int]:
        return self.codec.encode(KEY_LINE.format(key=key))

    def answer(self, key: str) -> list[int]:
        return self.codec.encode(ANSWER.format(key=key))

    def fixed_length(self, key: str) -> int:
        """Tokens of the prompt that are not filler: task, key line, question."""
        return len(self.task) + len(self.key_line(key)) + len(self.question)

    def filler(self, tokens: int) -> tuple[list[int], list[int]]:
        """(ids, sentence boundaries): the sentences repeated and cut to `tokens` ids; the
        boundaries are the indices where a sentence starts, plus 0 and `tokens`."""
        ids, bounds = [], [0]
        while len(ids) < tokens:
            ids += self.sentences[(len(bounds) - 1) % len(self.sentences)]
            bounds.append(len(ids))
        return ids[:tokens], sorted({b for b in bounds if b < tokens} | {tokens})


def split_at_depth(bounds: list[int], tokens: int, depth: float) -> int:
    """The sentence boundary nearest to depth x tokens (the lower one on a tie)."""
    target = depth * tokens
    return min(bounds, key=lambda b: (abs(b - target), b))


def build_prompt(text: PassKeyText, length: int, depth: float, key: str) -> PassKeyPrompt:
    """A prompt of exactly `length` tokens with `key` at `depth` (0: right after the task, the
    paper's format; 1: right before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth {depth}: must be a fraction in [0, 1] (0: key first, 1: key last)")
    filler_tokens = length - text.fixed_length(key)
    if filler_tokens < 0:
        raise ValueError(below_fixed_part(text, length, key))
    filler, bounds = text.filler(filler_tokens)
    k = split_at_depth(bounds, filler_tokens, depth)
    ids = text.task + filler[:k] + text.key_line(key) + filler[k:] + text.question
    key_start = len(text.task) + k + len(text.intro)
    return PassKeyPrompt(ids, key, key_start, k, filler_tokens - k, text.answer(key))


def below_fixed_part(text: PassKeyText, length: int, key: str, extra: int = 0, what: str = "") -> str:
    fixed = text.fixed_length(key) + extra
    return (f"passkey length {length} is below the prompt's fixed part: {fixed} tokens with tokenizer "
            f"{text.codec.spec} (task sentence, key line with key {key}, question{what}) leave no room; "
            f"use lengths >= {fixed}")


def check_lengths(text: PassKeyText, lengths: list[int], keys_by_length: dict[int, list[str]]) -> None:
    """One ValueError for the first length that cannot hold one of its prompts."""
    for length in lengths:
        for key in keys_by_length[length]:
            if length < text.fixed_length(key):
                raise ValueError(below_fixed_part(text, length, key))


def draw_keys(seed: int, length: int, trials: int) -> list[str]:
    """`trials` random 5-digit keys (10000-99999) for one length, the same at every depth."""
    rng = np.random.default_rng([seed, length, _KEY_STREAM])
    return [str(k) for k in rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, size=trials)]


@dataclass(frozen=True)
class Score:
    exact: bool  # the first integer of the answer is the key
    digits: int  # key digits in place among the first integer's first five characters


_INTEGER = re.compile(r"\d+")


def score_answer(answer: str, key: str) -> Score:
    """Exact match of the first integer in `answer`; a longer or shorter number is wrong."""
    found = _INTEGER.search(answer)
    if found is None:
        return Score(False, 0)
    number = found.group()
    return Score(number == key, sum(a == b for a, b in zip(number[: len(key)], key)))
