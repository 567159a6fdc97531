"""Streaming generation: prefill the prompt in micro-chunks, then decode one token at a time.

    gen = FAMGenerator(model)                     # a whole FAMLanguageModel, TP=1, one process
    out = gen.generate(prompt, max_new_tokens=64, sampling=Sampling(temperature=0.8, top_p=0.9),
                       stop_tokens=[eos], generator=torch.Generator().manual_seed(0))
    out.tokens [b, n], out.lengths [b]            # prompt [b, s]: a batch of equal lengths

Prefill: the prompt's whole blocks go through the model's own forward with `state` (the
layer-major path every other test checks), `prefill_chunk_blocks` blocks per call, keeping only
the last token's hidden state (never all logits: 256k vocabulary x 8k tokens is 8 GB). The rest
of the prompt (a partial block, or a prompt shorter than one block) then goes through the decode
path in one piece. Decode: per layer, model/generation/layer_step.py over the window of
model/generation/cache.py, so FAM and BSWA use O(m*C + F + C) memory per layer whatever the
number of generated tokens. Dense attention keeps a plain KV cache that grows with the sequence;
its forward carries no state, so its prompt goes through the decode path, in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from model.generation.cache import DecodeState, LayerCache
from model.generation.layer_step import block_rows, close_block, fam_keys, prompt_stream
from model.generation.sampling import Sampling, choose_next
from model.state import FAMState

PAD = -1  # in Generation.tokens after a sequence's stop token: not a token id, so misuse fails loudly


@dataclass
class Generation:
    tokens: torch.Tensor  # [b, n] new tokens (long); PAD after a sequence's stop token
    lengths: torch.Tensor  # [b] new tokens per sequence, its stop token included


class FAMGenerator:
    """Decode state for one batch of sequences; `prefill` starts it, `step` advances it."""

    def __init__(self, model, prefill_chunk_blocks: int = 8):
        _check_model(model)
        if prefill_chunk_blocks < 1:
            raise ValueError(f"prefill_chunk_blocks={prefill_chunk_blocks}: must be >= 1 (blocks per prefill call)")
        self.model, self.config = model, model.config
        self._chunk_tokens = prefill_chunk_blocks * self.config.block_size  # per prefill call
        self.state: DecodeState | None = None

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Start new sequences: prompt [b, s] -> logits [b, V] of the token after the prompt."""
        prompt = self._check_tokens(prompt, "prompt", dims=2)
        b, s = prompt.shape
        if self.config.attention == "dense":
            self.state = DecodeState([self._allocate(layer, b, s) for layer in self.model.layers], 0, None, False)
            return self._feed(prompt)
        whole = s - s % self.config.block_size
        last_hidden, model_state = self._prefill_blocks(prompt[:, :whole])
        self.state = self._fresh_state(b) if model_state is None else self._state_from(model_state, b)
        return self._logits(last_hidden) if whole == s else self._feed(prompt[:, whole:])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence: tokens [b] -> logits [b, V] of the token after it."""
        if self.state is None:
            raise RuntimeError("FAMGenerator.step: call prefill(prompt) first")
        tokens = self._check_tokens(tokens, "tokens", dims=1)
        batch = self.state.layers[0].k.shape[1]
        if tokens.shape[0] != batch:
            raise ValueError(f"tokens: batch {tokens.shape[0]} differs from the prompt's {batch}")
        return self._feed(tokens[:, None])

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_tokens: Iterable[int] = (), generator: torch.Generator | None = None) -> Generation:
        """Prefill, then up to max_new_tokens per sequence; a sequence ends at its first stop
        token, the batch when all have ended. Ended sequences keep stepping on token 0 (a batch
        advances together) and their outputs are dropped. Afterwards the state has consumed the
        prompt and every generated token but the last."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        sampling.validate()
        stops = torch.as_tensor(list(stop_tokens), dtype=torch.long)
        self._check_tokens(stops, "stop_tokens", dims=1, allow_empty=True)
        logits = self.prefill(prompt)
        b = logits.shape[0]
        stops = stops.to(logits.device)
        done = torch.zeros(b, dtype=torch.bool, device=logits.device)
        lengths = torch.zeros(b, dtype=torch.long, device=logits.device)
        new = []
        for i in range(max_new_tokens):
            token = torch.where(done, PAD, choose_next(logits, sampling, generator))
            new.append(token)
            lengths += (~done).long()
            done |= torch.isin(token, stops)
            if i == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self._feed(token.clamp(min=0)[:, None])
        tokens = torch.stack(new, 1) if new else torch.zeros(b, 0, dtype=torch.long, device=logits.device)
        return Generation(tokens, lengths)

    # ------------------------------------------------------------------ internals

    def _feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] through the decode path, split at block ends (dense: in chunks)."""
        st, lo, logits = self.state, 0, None
        while lo < tokens.shape[1]:
            room = self._chunk_tokens if st.block_size is None else st.block_size - st.block_filled
            logits = self._extend(tokens[:, lo : lo + room])
            lo += room
        return logits

    def _extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """n new tokens [b, n] that fit in the current block -> logits [b, V] of the last one."""
        st, (b, n) = self.state, tokens.shape
        positions = (st.position + torch.arange(n, dtype=torch.float32, device=tokens.device)).expand(b, n)
        completes = st.block_size is not None and st.block_filled + n == st.block_size
        x = self.model.embedding(tokens).transpose(0, 1)  # [n, b, h]
        for layer, cache in zip(self.model.layers, st.layers):
            x = block_rows(layer, cache, x, positions)
            if completes:  # this layer's FAM update reads only this layer's block K/V
                close_block(layer, cache, st.position + n - st.block_size, st.first_update_pending)
        st.position += n
        st.first_update_pending = st.first_update_pending and not completes
        return self._logits(x[-1:])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, b, h] of one token -> logits [b, V]."""
        logits, _ = self.model.output_layer(self.model.final_norm(hidden))
        return logits[0]

    def _prefill_blocks(self, tokens: torch.Tensor):
        """Whole blocks [b, k*C] through the model's forward in chunks -> (last hidden [1, b, h], FAMState)."""
        m, (b, s) = self.model, tokens.shape
        state, last = None, None
        for lo in range(0, s, self._chunk_tokens):
            piece = tokens[:, lo : lo + self._chunk_tokens]
            positions = m.positions(b, piece.shape[1], state, 0.0, tokens.device)
            hidden, layer_states = m.run_layers(m.embed(piece), positions, state)
            state, last = FAMState(layer_states, lo + piece.shape[1]), hidden[-1:]
        return last, state

    def _state_from(self, model_state: FAMState, batch: int) -> DecodeState:
        """The decode state after whole blocks: the forward's FAM and memory, plus the FAM's K/V."""
        caches, position = [], model_state.position
        for layer, ls in zip(self.model.layers, model_state.layers):
            cache = self._allocate(layer, batch)
            if ls.mem_k is not None:
                cache.load_memory(ls.mem_k, ls.mem_v)
            if ls.fam is not None:
                cache.set_fam(ls.fam, *fam_keys(layer, ls.fam, position - self.config.fam_len))
            caches.append(cache)
        return DecodeState(caches, position, self.config.block_size, first_update_pending=False)

    def _fresh_state(self, batch: int) -> DecodeState:
        """Nothing consumed yet: layer l's FAM is the soft prompt after layers < l (the prompt
        stream), as keys at the F positions before the first block; the first update has a
        zero residual (paper B.1)."""
        m, caches = self.model, []
        prompt = None
        if m.fam_prompt is not None:
            prompt = m.fam_prompt[:, None].expand(-1, batch, -1).to(m.embedding.weight.dtype)  # [F, b, h]
        for layer in m.layers:
            cache = self._allocate(layer, batch)
            if prompt is not None:
                cache.set_fam(prompt, *fam_keys(layer, prompt, -self.config.fam_len))
                prompt = prompt_stream(layer, prompt, 0)
            caches.append(cache)
        return DecodeState(caches, 0, self.config.block_size, first_update_pending=m.fam_prompt is not None)

    def _allocate(self, layer, batch: int, dense_rows: int = 0) -> LayerCache:
        cfg, att, weight = self.config, layer.attention, self.model.embedding.weight
        like = weight.new_empty(0, batch, att.groups, att.head_dim)
        if cfg.attention == "dense":
            return LayerCache.allocate(0, 0, dense_rows, growable=True, like=like)
        mem_rows = cfg.mem_blocks * cfg.block_size
        return LayerCache.allocate(mem_rows, cfg.fam_len, cfg.block_size, growable=False, like=like)

    def _check_tokens(self, tokens, name: str, dims: int, allow_empty: bool = False) -> torch.Tensor:
        """Token ids of the right rank, inside the vocabulary, on the model's device."""
        vocab = self.config.vocab_size
        if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor of token ids, got {type(tokens).__name__}"
                             f"{'' if not isinstance(tokens, torch.Tensor) else ' of ' + str(tokens.dtype)}")
        if tokens.dim() != dims:
            layout = "[b, s]" if dims == 2 else "[b]"
            raise ValueError(f"{name}: expected {dims} dimensions {layout}, got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            if allow_empty:
                return tokens
            raise ValueError(f"{name}: empty (shape {tuple(tokens.shape)}); give at least one token per sequence")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"{name}: token id {low if low < 0 else high} is outside the vocabulary [0, {vocab})")
        return tokens.to(device=self.model.embedding.weight.device, dtype=torch.long)


def _check_model(model) -> None:
    cfg = model.config
    if cfg.tensor_model_parallel_size != 1:
        raise ValueError(f"generation runs in one process: the model has tensor_parallel_size="
                         f"{cfg.tensor_model_parallel_size}; build it at TP=1 and load a consolidated checkpoint")
    if not (model.pre_process and model.post_process) or len(model.layers) != cfg.num_layers:
        raise ValueError(f"generation needs the whole model: this is a pipeline stage with layers "
                         f"{list(model.layer_range)} of {cfg.num_layers}; build it with pipeline_parallel_size=1")


def generate(model, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_tokens: Iterable[int] = (), generator: torch.Generator | None = None,
             prefill_chunk_blocks: int = 8) -> Generation:
    """One call: FAMGenerator(model).generate(...). prompt [b, s] -> Generation."""
    return FAMGenerator(model, prefill_chunk_blocks).generate(prompt, max_new_tokens, sampling, stop_tokens, generator)
