"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Order (the usual one): logits / temperature -> softmax -> keep the top-k -> renormalise -> keep
the top-p nucleus -> renormalise -> draw. Shapes: logits [b, V] -> tokens [b].
A seeded torch.Generator makes the draws reproducible; draws happen on the generator's device,
so a CPU generator gives the same tokens for the same probabilities on CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k / top_p only apply when sampling."""

    temperature: float = 0.0
    top_k: int | None = None  # keep the k most likely tokens (and any tied with the k-th)
    top_p: float | None = None  # keep the smallest most-likely set whose probability reaches p

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy decoding)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1, or None for no top-k cut")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1], or None for no nucleus cut")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise ValueError("top_k / top_p have no effect with temperature=0 (greedy); set temperature > 0 to sample")


def next_token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [b, V] -> the distribution sampled from [b, V] (fp32, rows sum to 1)."""
    sampling.validate()
    if sampling.temperature == 0:
        raise ValueError("temperature=0 is greedy: there is no distribution to sample from")
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_k is not None and sampling.top_k < probs.shape[-1]:
        kth = probs.topk(sampling.top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if sampling.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token stays if the mass strictly before it is below p: the most likely always stays,
        # and the set stops at the first token that brings the total to p or beyond.
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < sampling.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [b, V] -> next tokens [b] (long, on the logits' device)."""
    if sampling.temperature == 0:
        sampling.validate()
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, sampling)
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
