"""The FAM language model on megatron-core: embedding, FAM prompt, FAM layers, final norm, head.

One tensor flows between layers (and, later, pipeline stages): [F + S, b, h], the FAM prompt
rows followed by the block tokens. The loss and logits use block tokens only (docs/fam.md, "The algorithm").
The model is split into `embed`, `run_layers` and `head` so a pipeline stage can run any part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from torch.utils.checkpoint import checkpoint

from model import rope, scan_stash
from model.config import FAMConfig, check_sequence_parallel_length
from model.layer import FAMLayer
from model.loss import vocab_parallel_cross_entropy
from model.norm import build_norm
from model.state import FAMState


LOSS_CHUNK_ELEMENTS = 2**27  # logits elements per loss chunk: ~1.3 GB of bf16 + fp32 transients


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # mean cross-entropy over all label tokens
    logits: torch.Tensor | None  # [b, s, vocab / tp]: this rank's vocabulary shard
    state: FAMState


class FAMLanguageModel(MegatronModule):
    """The whole model, or a pipeline part of it: layers `layer_range`, the embedding and FAM
    prompt with `pre_process`, the final norm and output layer with `post_process`. `tp_group` is
    the tensor-parallel group of every collective inside (model/groups.py); build it with
    model.build_model or model.build_model_parts."""

    def __init__(self, config: FAMConfig, layer_range: range | None = None, pre_process: bool = True,
                 post_process: bool = True, *, tp_group):
        super().__init__(config)
        self.tp_group = tp_group
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_range = layer_range or range(config.num_layers)
        h, F = config.hidden_size, config.fam_len
        self.local_fam_rows = F // (config.tensor_model_parallel_size if config.sequence_parallel else 1)
        if pre_process:
            self.embedding = VocabParallelEmbedding(
                config.vocab_size, h, init_method=config.init_method, config=config, tp_group=tp_group
            )
            self.fam_prompt = torch.nn.Parameter(torch.empty(F, h, dtype=config.params_dtype)) if F else None
            if F:
                config.init_method(self.fam_prompt)
        self.layers = torch.nn.ModuleList(FAMLayer(config, i, tp_group=tp_group) for i in self.layer_range)
        if post_process:
            self.final_norm = build_norm(config, tp_group)
            self.output_layer = ColumnParallelLinear(
                h, config.vocab_size, config=config, init_method=config.init_method, bias=False, gather_output=False,
                tp_group=tp_group,
            )

    def global_name(self, name: str) -> str:
        """A parameter's name in the whole model: a pipeline part numbers its layers from 0."""
        if not name.startswith("layers."):
            return name
        local, rest = name[len("layers.") :].split(".", 1)
        return f"layers.{self.layer_range[int(local)]}.{rest}"

    def positions(self, batch: int, seq: int, state: FAMState | None, position_offset, device) -> torch.Tensor:
        """Float positions [b, s]: offset (RPO) + tokens consumed before + arange."""
        start = 0 if state is None else state.position
        if isinstance(position_offset, torch.Tensor):  # RPO, per example
            if position_offset.device.type == "cpu" and torch.device(device).type == "cuda":
                # from pinned memory, asynchronously: a pageable copy waits for the GPU to catch up
                position_offset = position_offset.float().pin_memory().to(device, non_blocking=True)
            offset = position_offset.to(device, torch.float32).reshape(-1, 1).expand(batch, 1)
        else:  # filled on the device: a tensor made from a Python number is a host copy the CPU waits for
            offset = torch.full((batch, 1), float(position_offset), device=device)
        return offset + start + torch.arange(seq, dtype=torch.float32, device=device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> [F + s, b, h] (this rank's [F/tp + s/tp, b, h] with SP)."""
        x = self.embedding(tokens).transpose(0, 1)  # [s, b, h]
        rows = [x] if self.fam_prompt is None else [self.fam_prompt[:, None, :].expand(-1, x.shape[1], -1).to(x.dtype), x]
        if self.config.sequence_parallel:
            rows = [scatter_to_sequence_parallel_region(r.contiguous(), group=self.tp_group) for r in rows]
        return torch.cat(rows)

    def run_layers(self, hidden, positions, state: FAMState | None):
        """hidden [F + s, b, h] through this module's layers; returns (hidden, their states)."""
        new_states = []
        with rope.SHARED.scope():  # the RoPE tables, computed once for all layers
            for i, layer in enumerate(self.layers):
                layer_state = None if state is None else state.layers[i]
                if self.config.recompute_granularity == "full" and torch.is_grad_enabled():
                    keep_scan = {} if self.config.recompute_fam_scan else {"context_fn": scan_stash.contexts}
                    hidden, s = checkpoint(layer, hidden, positions, layer_state, use_reentrant=False, **keep_scan)
                else:
                    hidden, s = layer(hidden, positions, layer_state)
                new_states.append(s)
        return hidden, new_states

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [F + s, b, h] -> logits [s, b, V/tp] of the block tokens (never the FAM rows)."""
        logits, _ = self.output_layer(self.final_norm(hidden[self.local_fam_rows :]))
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of vocab-parallel logits [s, b, V/tp] against labels [b, s]."""
        return vocab_parallel_cross_entropy(logits.float().clone(), labels.t().contiguous(), self.tp_group).mean()

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy straight from the last hidden state, never holding all logits:
        the output layer and the loss run over chunks of tokens, each recomputed in backward
        (with a 256k vocabulary the full logits are the largest activation of the model)."""
        x = self.final_norm(hidden[self.local_fam_rows :])  # [s, b, h] (this rank's s/tp with SP)
        if self.config.sequence_parallel:  # all tokens; backward reduce-scatters the partial grads
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.tp_group)
        elif self.config.tensor_model_parallel_size > 1:  # column-parallel input: all-reduce in backward
            x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        s, b = x.shape[0], x.shape[1]
        vocab_local = self.output_layer.weight.shape[0]
        chunk = max(1, LOSS_CHUNK_ELEMENTS // (b * vocab_local))
        total = x.new_zeros((), dtype=torch.float32)
        for lo in range(0, s, chunk):
            part = (x[lo : lo + chunk], labels[:, lo : lo + chunk])
            if torch.is_grad_enabled() and s > chunk:
                total = total + checkpoint(self._chunk_loss_sum, *part, use_reentrant=False)
            else:
                total = total + self._chunk_loss_sum(*part)
        return total / (s * b)

    def _chunk_loss_sum(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(x, self.output_layer.weight)  # [c, b, V/tp]
        return vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous(), self.tp_group).sum()

    def forward(self, tokens, labels=None, state: FAMState | None = None, position_offset=0.0, return_logits: bool = True) -> ModelOutput:
        """tokens, labels [b, s]. With labels and return_logits=False (training), the loss is
        computed chunk by chunk and no logits are kept (ModelOutput.logits is None)."""
        if state is not None and state.ends_mid_block:
            raise ValueError("the state ends in a partial block and cannot be continued: feed pieces whose lengths are multiples of model.block_size, except the last")
        b, s = tokens.shape
        if self.config.sequence_parallel:
            check_sequence_parallel_length(s, self.config.tensor_model_parallel_size)
        if state is not None and state.position % self.config.block_size:
            raise ValueError(f"state.position={state.position} is not a multiple of block_size={self.config.block_size}")
        positions = self.positions(b, s, state, position_offset, tokens.device)
        hidden, layer_states = self.run_layers(self.embed(tokens), positions, state)
        logits = self.head(hidden) if return_logits or labels is None else None
        if labels is None:
            loss = None
        else:
            loss = self.loss(logits, labels) if logits is not None else self.lm_loss(hidden, labels)
        new_state = FAMState(layer_states, (0 if state is None else state.position) + s, s % self.config.block_size != 0)
        return ModelOutput(loss, None if logits is None else logits.transpose(0, 1), new_state)
