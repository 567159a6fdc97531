"""PassKey accuracy of a model over a length x depth grid (issue 15 item 2).

    results = run_passkey(model, codec, PassKeySettings(lengths=[1024, 4096], depths=[0, .5, 1], trials=8))
    results["cells"]  # one per (length, depth): accuracy, digit accuracy, answers

Each cell's trials are prompts of one length (pipeline/evaluation/passkey.py), so they stack into
batches [batch, length] and go through model/generation's streaming generator: the prompt is
prefilled `chunk_tokens` at a time with the state carried (O(1) memory in the length for FAM and
BSWA: 256x the training length fits), then the answer is decoded greedily, a few tokens past the
key's own length, stopping at end-of-document. The answer is scored by exact match of its first
integer. `cells` restricts the grid to some cells (data-parallel ranks split the grid).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from model.generation import FAMGenerator
from pipeline.evaluation.codec import Codec
from pipeline.evaluation.passkey import PassKeyText, build_prompt, check_lengths, draw_keys, score_answer

EXTRA_ANSWER_TOKENS = 2  # decoded past the key: a sixth digit right after it makes the answer wrong
EXAMPLES_PER_CELL = 3  # answers kept in the results, for reading what the model said


@dataclass
class PassKeySettings:
    lengths: list[int]  # prompt lengths in tokens
    depths: list[float]  # key depth fractions in [0, 1]; 0 is the paper's key-first prompt
    trials: int = 8  # prompts per (length, depth), each with its own key
    seed: int = 0
    batch_size: int = 8  # prompts generated together
    chunk_tokens: int = 1024  # prefill tokens per forward call (a multiple of the block size)

    def grid(self) -> list[tuple[int, float]]:
        return [(length, depth) for length in self.lengths for depth in self.depths]


def check_settings(text: PassKeyText, settings: PassKeySettings, block_size: int) -> None:
    """Every bad setting as one ValueError, before any model work."""
    if not settings.lengths or not settings.depths:
        raise ValueError(f"passkey needs lengths and depths, got lengths={settings.lengths} depths={settings.depths}")
    for depth in settings.depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth {depth}: must be a fraction in [0, 1] (0: key first, 1: key last)")
    for name in ("trials", "batch_size", "chunk_tokens"):
        if getattr(settings, name) < 1:
            raise ValueError(f"passkey {name}={getattr(settings, name)}: must be >= 1")
    if settings.chunk_tokens % block_size:
        raise ValueError(f"passkey chunk_tokens={settings.chunk_tokens}: must be a multiple of the model's "
                         f"block_size={block_size} (the prefill carries the state across whole blocks)")
    check_lengths(text, settings.lengths, {n: draw_keys(settings.seed, n, settings.trials) for n in settings.lengths})


def run_passkey(model, codec: Codec, settings: PassKeySettings, cells: list[tuple[int, float]] | None = None,
                autocast=contextlib.nullcontext) -> dict:
    """Accuracy per (length, depth) cell of `cells` (default: the whole grid) as a JSON-able dict."""
    text = PassKeyText(codec)
    cfg = model.config
    check_settings(text, settings, cfg.block_size)
    if codec.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {codec.spec} has {codec.vocab_size} ids but the model's vocabulary is "
                         f"{cfg.vocab_size}: evaluate with the tokenizer the model was trained with")
    was_training = model.training
    model.eval()
    try:
        results = [_run_cell(model, text, settings, length, depth, autocast)
                   for length, depth in (cells if cells is not None else settings.grid())]
    finally:
        model.train(was_training)
    return {"tokenizer": codec.spec, "trials": settings.trials, "seed": settings.seed,
            "lengths": list(settings.lengths), "depths": list(settings.depths), "cells": results}


def _run_cell(model, text: PassKeyText, settings: PassKeySettings, length: int, depth: float, autocast) -> dict:
    prompts = [build_prompt(text, length, depth, key) for key in draw_keys(settings.seed, length, settings.trials)]
    answers = []
    for lo in range(0, len(prompts), settings.batch_size):
        answers += _generate(model, text.codec, prompts[lo : lo + settings.batch_size], settings, autocast)
    scores = [score_answer(answer, p.key) for answer, p in zip(answers, prompts)]
    return {
        "length": length, "depth": depth,
        "accuracy": sum(s.exact for s in scores) / len(scores),
        "digit_accuracy": sum(s.digits for s in scores) / (len(scores) * len(prompts[0].key)),
        "key_distance": sum(len(p.ids) - p.key_start for p in prompts) / len(prompts),  # tokens, key to end
        "examples": [{"key": p.key, "answer": a} for p, a in zip(prompts[:EXAMPLES_PER_CELL], answers)],
    }


def _generate(model, codec: Codec, prompts, settings: PassKeySettings, autocast) -> list[str]:
    """Greedy answers (decoded text) to prompts of one length, generated as one batch."""
    device = model.embedding.weight.device
    tokens = torch.tensor([p.ids for p in prompts], dtype=torch.long, device=device)  # [b, length]
    new_tokens = max(len(p.answer_ids) for p in prompts) + EXTRA_ANSWER_TOKENS
    generator = FAMGenerator(model, prefill_chunk_blocks=settings.chunk_tokens // model.config.block_size)
    with autocast():
        out = generator.generate(tokens, new_tokens, stop_tokens=[codec.eod_id])
    return [codec.decode(row[:n].tolist()) for row, n in zip(out.tokens, out.lengths)]
