"""TransformerFAM (Hwang et al., arXiv 2404.09173) for Hugging Face transformers, self-contained.

An exported famtron model ships this file beside its weights (pipeline/hf/convert.py copies it
verbatim); `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it through
`auto_map`. It needs torch and transformers only. It implements the same readings of the paper as
famtron's oracle (model/reference.py), and its logits equal famtron's (tests/test_hf_export.py):

Per layer and block t of C tokens (the paper's Algorithm 2; pre-RMSNorm, SwiGLU FFN):
    block queries attend [K/V of the previous m blocks; F_{t-1}; the block so far, causal];
    FAM queries attend [F_{t-1} (full); the whole block t], never the memory blocks;
    A = Attn + residual, out = FFN(Norm(A)) + A; FAM rows and tokens share every weight.
    F_t, the FAM rows' output, feeds the same layer at block t+1.
Initial FAM ("soft prompt"): a learned F x h prompt flows up the stack as its own stream: at
    each layer the prompt rows attend only among themselves (full attention) and go through the
    FFN; layer l's initial FAM is the prompt after layers < l, so it depends on no token.
    The first FAM update has a zero residual (paper B.1); later updates the previous FAM.
Positions (RoPE, rotate-half, base `rope_base`): tokens at their absolute positions from 0;
    F_t as keys at the last F positions of block t (the F positions just before block t+1; the
    initial FAM and the prompt stream at -F..-1); the FAM queries compressing block t at the last
    F positions of block t.
attention_kind "bswa" is the same with F = 0; "dense" is full causal attention.

The cache (`FAMtronCache`, passed and returned as `past_key_values`) holds per layer only the
FAM rows, the last m blocks' K/V and the current partial block's K/V: O(1) memory in sequence
length, so `generate()` runs in constant memory. The FAM update runs when a block completes.
Tokens run block by block (a prompt of any length is cut at block boundaries).

Weights: model.embed_tokens [V, h], model.fam_prompt [F, h]; per layer input_layernorm [h],
self_attn.q_proj [n*d, h], k_proj, v_proj [g*d, h] (head j of q uses K/V head j // (n/g)),
o_proj [h, n*d], post_attention_layernorm [h], mlp.gate_proj, up_proj [ff, h], down_proj [h, ff];
model.norm [h], lm_head [V, h] (untied).
Batches: every row shares positions, so padding may only trail (right padding), and a cache
that has seen padding cannot be continued.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F_
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_famtron import FAMtronConfig

EXPORT_MANIFEST = "famtron_export.json"


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [s, d] (fp32) for positions [s]; angles in fp64 so large positions stay exact."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE (rotate-half) of x [b, heads, s, d] at positions [s], computed in fp32."""
    cos, sin = rope_tables(positions, x.shape[-1], base)
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def offsets(first: int, count: int, device) -> torch.Tensor:
    return torch.arange(first, first + count, dtype=torch.float64, device=device)


class FAMtronRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F_.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FAMtronLayerState:
    """What one layer carries between blocks. Shapes: fam [b, F, h]; fam_q [b, n, F, d] (RoPE at
    the current block's last F positions); fam_k, fam_v, mem_*, part_* [b, g, *, d]."""

    def __init__(self):
        self.fam = self.fam_q = self.fam_k = self.fam_v = None
        self.first_update = True  # the FAM is the prompt stream's: its update has a zero residual
        self.mem_k = self.mem_v = None  # the last m complete blocks (dense: every token so far)
        self.part_k = self.part_v = None  # the current block's tokens so far

    def prefix(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values a new token of the current block sees before its own block's new rows."""
        pairs = [(self.mem_k, self.mem_v), (self.fam_k, self.fam_v), (self.part_k, self.part_v)]
        return [k for k, _ in pairs if k is not None], [v for _, v in pairs if v is not None]


class FAMtronCache:
    """The generation cache: per layer a FAMtronLayerState, plus the tokens consumed so far."""

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int, batch_size: int):
        self.layers = [FAMtronLayerState() for _ in range(num_layers)]
        self.batch_size = batch_size
        self.position = 0
        self.padded = False  # a call with padding left rows at different positions

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def __len__(self) -> int:
        return len(self.layers)


def append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=2)


class FAMtronAttention(nn.Module):
    def __init__(self, config: FAMtronConfig):
        super().__init__()
        n, g, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.heads, self.groups, self.head_dim, self.base = n, g, d, config.rope_base
        self.q_proj = nn.Linear(h, n * d, bias=False)
        self.k_proj = nn.Linear(h, g * d, bias=False)
        self.v_proj = nn.Linear(h, g * d, bias=False)
        self.o_proj = nn.Linear(n * d, h, bias=False)

    def project(self, x: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """x [b, s, h] (normed) -> q [b, n, s, d], k, v [b, g, s, d]; RoPE at q_pos / k_pos [s]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.groups, self.head_dim).transpose(1, 2)
        return rotate(q, q_pos, self.base), rotate(k, k_pos, self.base), v

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """q [b, n, s, d] over k, v [b, g, S, d] (mask [s, S] bool, None = all) -> [b, s, h]."""
        out = F_.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class FAMtronMLP(nn.Module):
    def __init__(self, config: FAMtronConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F_.silu(self.gate_proj(x)) * self.up_proj(x))


class FAMtronDecoderLayer(nn.Module):
    def __init__(self, config: FAMtronConfig):
        super().__init__()
        self.config = config
        self.input_layernorm = FAMtronRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = FAMtronAttention(config)
        self.post_attention_layernorm = FAMtronRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FAMtronMLP(config)

    def ffn(self, a: torch.Tensor) -> torch.Tensor:
        """out = FFN(Norm(A)) + A, for tokens and FAM rows alike."""
        return self.mlp(self.post_attention_layernorm(a)) + a

    def fam_rows(self, rows: torch.Tensor, q, keys, values, residual: torch.Tensor) -> torch.Tensor:
        """FAM rows [b, F, h] with queries q attend keys/values in full, then the FFN."""
        return self.ffn(self.self_attn.attend(q, keys, values, None) + residual)

    def prompt_forward(self, prompt: torch.Tensor) -> torch.Tensor:
        """The soft-prompt stream: prompt [b, F, h] attends only to itself at positions -F..-1."""
        pos = offsets(-prompt.shape[1], prompt.shape[1], prompt.device)
        q, k, v = self.self_attn.project(self.input_layernorm(prompt), pos, pos)
        return self.fam_rows(prompt, q, k, v, prompt)

    def start_block(self, state: FAMtronLayerState, fam: torch.Tensor, block_start: int) -> None:
        """Make fam [b, F, h] the FAM read by the block starting at block_start: its keys sit at the
        F positions before the block, its queries (for the update) at the block's last F."""
        n_f, C = fam.shape[1], self.config.block_size
        q_pos = offsets(block_start + C - n_f, n_f, fam.device)
        k_pos = offsets(block_start - n_f, n_f, fam.device)
        q, k, v = self.self_attn.project(self.input_layernorm(fam), q_pos, k_pos)
        state.fam, state.fam_q, state.fam_k, state.fam_v = fam, q, k, v

    def block_forward(self, x: torch.Tensor, start: int, state: FAMtronLayerState) -> torch.Tensor:
        """Tokens x [b, c, h] at positions start.. inside one block (or any run of tokens, for
        dense attention): they see the state's keys in full and each other causally."""
        c = x.shape[1]
        pos = offsets(start, c, x.device)
        q, k, v = self.self_attn.project(self.input_layernorm(x), pos, pos)
        keys, values = state.prefix()
        seen = sum(t.shape[2] for t in keys)
        mask = None
        if c > 1:
            mask = torch.ones(c, seen + c, dtype=torch.bool, device=x.device)
            mask[:, seen:] = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
        out = self.ffn(self.self_attn.attend(q, torch.cat(keys + [k], dim=2), torch.cat(values + [v], dim=2), mask) + x)
        if self.config.attention_kind == "dense":
            state.mem_k, state.mem_v = append(state.mem_k, k), append(state.mem_v, v)
        else:
            state.part_k, state.part_v = append(state.part_k, k), append(state.part_v, v)
        return out

    def finish_block(self, state: FAMtronLayerState, next_start: int) -> None:
        """The block just completed: update the FAM (Algorithm 2's FAM rows), move the block's
        K/V into the memory (keeping the last m blocks), start the next block."""
        cfg = self.config
        if state.fam is not None:
            residual = torch.zeros_like(state.fam) if state.first_update else state.fam
            new_fam = self.fam_rows(
                state.fam, state.fam_q, torch.cat([state.fam_k, state.part_k], dim=2),
                torch.cat([state.fam_v, state.part_v], dim=2), residual,
            )
            state.first_update = False
            self.start_block(state, new_fam, next_start)
        if cfg.mem_blocks:
            keep = cfg.mem_blocks * cfg.block_size
            state.mem_k = append(state.mem_k, state.part_k)[:, :, -keep:]
            state.mem_v = append(state.mem_v, state.part_v)[:, :, -keep:]
        state.part_k = state.part_v = None


def check_export_files(folder: str) -> None:
    """A local famtron export: every file its famtron_export.json lists is there at its size, so
    a missing or truncated file is named before transformers reads it. (famtron's import_hf
    checks the full sha256; this stays cheap for large models.)"""
    manifest = os.path.join(folder, EXPORT_MANIFEST)
    if not os.path.isfile(manifest):
        return  # e.g. a folder written by save_pretrained
    with open(manifest, encoding="utf-8") as f:
        files = json.load(f)["files"]
    for name, entry in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing (listed in {EXPORT_MANIFEST}); export the model again")
        if os.path.getsize(path) != entry["bytes"]:
            raise ValueError(
                f"{path}: {os.path.getsize(path)} bytes where {EXPORT_MANIFEST} says {entry['bytes']}: damaged or "
                f"truncated; export the model again (or delete {EXPORT_MANIFEST} if you replaced the file on purpose)"
            )


class FAMtronPreTrainedModel(PreTrainedModel):
    config_class = FAMtronConfig
    base_model_prefix = "model"
    _no_split_modules = ["FAMtronDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if pretrained_model_name_or_path is not None and os.path.isdir(str(pretrained_model_name_or_path)):
            check_export_files(str(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: the model makes its FAMtronCache

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, FAMtronRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, FAMtronModel) and module.fam_prompt is not None:
            nn.init.normal_(module.fam_prompt, mean=0.0, std=std)


class FAMtronModel(FAMtronPreTrainedModel):
    def __init__(self, config: FAMtronConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.fam_prompt = nn.Parameter(torch.zeros(config.fam_len, config.hidden_size)) if config.fam_len else None
        self.layers = nn.ModuleList(FAMtronDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = FAMtronRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def new_cache(self, batch_size: int) -> FAMtronCache:
        """An empty cache; with FAM, each layer's initial FAM from the soft-prompt stream."""
        cache = FAMtronCache(len(self.layers), batch_size)
        if self.fam_prompt is not None:
            prompt = self.fam_prompt[None]  # [1, F, h]: the same for every row
            for layer, state in zip(self.layers, cache.layers):
                layer.start_block(state, prompt.expand(batch_size, -1, -1), 0)
                prompt = layer.prompt_forward(prompt)
        return cache

    def forward(self, input_ids: torch.LongTensor, cache: FAMtronCache) -> torch.Tensor:
        """input_ids [b, s] after cache.position tokens -> final hidden states [b, s, h]."""
        x = self.embed_tokens(input_ids)
        C, s, outs, done = self.config.block_size, input_ids.shape[1], [], 0
        while done < s:
            start = cache.position
            # Dense attention has no blocks; FAM and BSWA run up to the end of the current block.
            n = s - done if self.config.attention_kind == "dense" else min(s - done, C - start % C)
            piece = x[:, done : done + n]
            for layer, state in zip(self.layers, cache.layers):
                piece = layer.block_forward(piece, start, state)
                if self.config.attention_kind != "dense" and (start + n) % C == 0:
                    layer.finish_block(state, start + n)
            outs.append(piece)
            done, cache.position = done + n, start + n
        return self.norm(torch.cat(outs, dim=1))


class FAMtronForCausalLM(FAMtronPreTrainedModel, GenerationMixin):
    def __init__(self, config: FAMtronConfig):
        super().__init__(config)
        self.model = FAMtronModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: FAMtronCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [b, s] continue past_key_values (or start a sequence) -> logits [b, s, V];
        loss when labels [b, s] are given (shifted inside, -100 ignored, as in transformers)."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("FAMtronForCausalLM takes input_ids (inputs_embeds is not supported)")
        cache = past_key_values if past_key_values is not None else self.model.new_cache(input_ids.shape[0])
        check_continuation(cache, input_ids, attention_mask)
        logits = self.lm_head(self.model(input_ids, cache))
        loss = None
        if labels is not None:
            loss = F_.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)


def check_continuation(cache: FAMtronCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Every row must sit at the same positions: padding may only trail, and a cache that saw
    padding (rows of different lengths) cannot be continued."""
    if not isinstance(cache, FAMtronCache):
        raise ValueError(f"past_key_values must be a FAMtronCache returned by this model, not {type(cache).__name__}")
    if cache.batch_size != input_ids.shape[0]:
        raise ValueError(f"past_key_values holds {cache.batch_size} rows but input_ids has {input_ids.shape[0]}")
    if cache.padded:
        raise ValueError("past_key_values saw padded rows (different lengths) and cannot be continued")
    if attention_mask is None:
        return
    mask = attention_mask[:, -input_ids.shape[1] :].bool()
    if not bool(mask.all()):
        if attention_mask.shape[1] > input_ids.shape[1] and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask pads earlier tokens: continue only unpadded rows")
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError(
                "attention_mask has left or inner padding: FAMtron rows share positions, so pad on the right "
                "(tokenizer.padding_side='right') or run one sequence at a time"
            )
        cache.padded = True
