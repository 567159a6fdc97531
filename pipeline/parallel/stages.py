"""Pipeline parallelism for the FAM model on the pipeline-parallel group (pipeline/parallel/groups.py).

megatron-core 0.16.1's pipeline schedules are CUDA-only, so the schedule is PyTorch's
`torch.distributed.pipelining` (GPipe, 1F1B, interleaved 1F1B), which runs on gloo in CI and on
NCCL on GPUs with the same code, given megatron's pipeline group.

What travels between stages is the model's one tensor [F + s, b, h] (FAM rows, then block
tokens) and the float positions [b, s] (the RPO offset is drawn once, before the first stage).
Micro-batches are sequences: the schedule splits the batch along dim 0. Stage layout: the first
(virtual) stage owns the embedding and the FAM prompt, the last the final norm and the output
layer; layers are split evenly unless `layout` gives each stage's layer count. With v virtual
stages per rank, rank r holds chunks r, r + p, r + 2p, ... (interleaved 1F1B).
Random state passing: each stage starts its layers from `initial_state` (or the learned prompt)
and appends its layers' final FAM to `forward_states` on every forward. The schedule may run an
extra shape-inference forward (on uninitialised tensors) before the real micro-batches, so the
step's first micro-batch is `forward_states[-n_microbatches]`, not `[0]`.
Truncated micro-chunks (train.micro_chunk_mode=truncated, issue 14): a long sample's micro-chunks
are the schedule's micro-batches, in order (`split_micro_chunks`); each stage starts micro-chunk k > 0
from the state its own layers ended micro-chunk k - 1 with, detached (`FAMStage.carry`), so no
gradient crosses a boundary. GPipe, 1F1B and interleaved 1F1B run each stage's forwards in
micro-batch order (tests/test_micro_chunk_steps.py records the order).
"""

from __future__ import annotations

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from model import ModelArgs, ModelPart, build_model_parts
from model.language_model import FAMLanguageModel
from model.state import FAMState, LayerState
from pipeline.config.rules import check_interleaved_micro_batches, check_schedule, layer_counts


def split_layers(num_layers: int, num_chunks: int, layout: list[int] | None = None) -> list[range]:
    """Layer ranges of each pipeline chunk (stage x virtual stage), in model order
    (pipeline/config/rules.py layer_counts: the layout, or an even split)."""
    counts = layer_counts(num_layers, num_chunks, layout)
    starts = [sum(counts[:i]) for i in range(num_chunks)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


class FAMStage(torch.nn.Module):
    """One pipeline chunk of the FAM language model: a FAMLanguageModel part (model.build_model_parts)."""

    def __init__(self, part: FAMLanguageModel):
        super().__init__()
        self.first, self.last = part.pre_process, part.post_process
        self.part = part
        self.initial_state: list[LayerState] | None = None
        self.forward_states: list[list[LayerState]] = []  # every forward since the step began
        self.carry: list[LayerState] | None = None  # truncated micro-chunks: this stage's state after the last one

    def forward(self, x: torch.Tensor, positions_or_offsets: torch.Tensor, chunk_index: torch.Tensor | None = None):
        """chunk_index [b] (truncated micro-chunks only): which micro-chunk of its sample this
        micro-batch is; 0 starts from initial_state, k > 0 from this stage's own state after
        micro-chunk k - 1 (the previous forward: the schedule keeps each stage's forward order),
        detached. Positions continue across micro-chunks through the offsets the step gives."""
        if self.first:  # x: tokens [b, s]; offsets [b]
            positions = self.part.positions(x.shape[0], x.shape[1], None, positions_or_offsets, x.device)
            hidden = self.part.embed(x)
        else:
            hidden, positions = x, positions_or_offsets
        state = self._start_state(chunk_index)
        hidden, states = self.part.run_layers(hidden, positions, state)
        self.forward_states.append([LayerState(None if s.fam is None else s.fam.detach()) for s in states])
        if chunk_index is not None:
            self.carry = [LayerState(*(None if t is None else t.detach() for t in (s.fam, s.mem_k, s.mem_v)))
                          for s in states]
        if self.last:
            return hidden  # the loss is computed from it in chunks (FAMLanguageModel.lm_loss)
        return (hidden, positions) if chunk_index is None else (hidden, positions, chunk_index)

    def _start_state(self, chunk_index: torch.Tensor | None) -> FAMState | None:
        # A shape-inference forward (uninitialised inputs, before the first real one) may read any
        # index; the real micro-chunk 0 that follows it ignores what it carried.
        continues = chunk_index is not None and self.carry is not None and bool(chunk_index[0] > 0)
        layers = self.carry if continues else self.initial_state
        return None if layers is None else FAMState(layers)


def stage_parts(num_layers: int, pp_rank: int, pp_size: int, virtual_stages: int = 1,
                layout: list[int] | None = None) -> list[tuple[int, ModelPart]]:
    """This rank's chunks (one per virtual stage) as (global chunk index, ModelPart)."""
    chunks = split_layers(num_layers, pp_size * virtual_stages, layout)
    own = [v * pp_size + pp_rank for v in range(virtual_stages)]
    return [(i, ModelPart(chunks[i], first=i == 0, last=i == len(chunks) - 1)) for i in own]


def build_stages(args: ModelArgs, pp_rank: int, pp_size: int, virtual_stages: int = 1, layout=None, **build):
    """This rank's stages as (global chunk index, FAMStage), built and initialised alone by the one
    model builder (`build` goes to model.build_model_parts: tp_group, device, seed, ...): the whole
    model's initial values (model/init.py), so PP = 2 starts from PP = 1's weights without any rank
    holding more than its layers."""
    chunks = stage_parts(args.num_layers, pp_rank, pp_size, virtual_stages, layout)
    parts = build_model_parts(args, [part for _, part in chunks], pipeline_parallel_size=pp_size, **build)
    return [(index, FAMStage(part)) for (index, _), part in zip(chunks, parts)]


def build_schedule(stages, pp_size: int, n_microbatches: int, schedule: str, group, device):
    """A torch.distributed.pipelining schedule over this rank's stages on the PP group."""
    check_schedule(schedule, len(stages))
    check_interleaved_micro_batches(schedule, n_microbatches, pp_size)
    n = pp_size * len(stages)
    pipe_stages = [PipelineStage(module, index, n, device, group=group) for index, module in stages]
    last = next((module for _, module in stages if module.last), None)
    loss_fn = last.part.lm_loss if last is not None else _no_loss
    if schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipe_stages, n_microbatches, loss_fn=loss_fn)
    cls = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    return cls(pipe_stages[0], n_microbatches, loss_fn=loss_fn)


def _no_loss(output, target):  # ranks without the last stage never compute a loss
    raise RuntimeError("loss requested on a rank that does not hold the last pipeline stage")


def pipeline_step(schedule, stages, tokens, labels, offsets, initial_state: list[LayerState] | None = None,
                  chunk_index: torch.Tensor | None = None):
    """Forward and backward of one batch through the pipeline. Gradients are the mean over
    micro-batches (the schedule scales by 1 / n_microbatches), like one process on the batch.
    `chunk_index` [n]: the batch is truncated micro-chunks (split_micro_chunks). Returns the mean
    loss on ranks with the last stage, else None."""
    for _, stage in stages:
        stage.forward_states.clear()
        stage.carry = None
        stage.initial_state = None if initial_state is None else [initial_state[i] for i in stage.part.layer_range]
    has_first = any(s.first for _, s in stages)
    has_last = any(s.last for _, s in stages)
    losses: list[torch.Tensor] = []
    args = ((tokens, offsets) if chunk_index is None else (tokens, offsets, chunk_index)) if has_first else ()
    schedule.step(*args, target=labels if has_last else None, losses=losses if has_last else None)
    return torch.stack(losses).mean().detach() if has_last else None


def split_micro_chunks(samples: torch.Tensor, offsets: torch.Tensor, chunk_len: int, micro_batch_size: int):
    """Truncated micro-chunks as the schedule's micro-batches, split along the sequence: samples
    [A x b, s + 1] (A micro-batches of b sequences) -> (inputs [A x K x b, c], labels [A x K x b, c],
    offsets [A x K x b], chunk_index [A x K x b]), ordered micro-batch a, then micro-chunk k, so
    the schedule's micro-batch a x K + k is chunk k of micro-batch a. Each chunk's offset is its
    RPO offset plus k x c: positions continue across micro-chunks. s = K x c (rules.py)."""
    inputs, labels = samples[:, :-1], samples[:, 1:]
    rows, seq = inputs.shape
    a, b, k = rows // micro_batch_size, micro_batch_size, seq // chunk_len

    def by_chunk(x):  # [A x b, K x c] -> [A x K x b, c]
        return x.reshape(a, b, k, chunk_len).transpose(1, 2).reshape(a * k * b, chunk_len)

    index = torch.arange(k, device=samples.device, dtype=torch.float32).view(1, k, 1).expand(a, k, b)
    chunk_offsets = offsets.float().view(a, 1, b) + index * chunk_len
    return by_chunk(inputs), by_chunk(labels), chunk_offsets.reshape(-1), index.reshape(-1)


def stage_state_dict(stages) -> dict[str, torch.Tensor]:
    """This rank's parameters under global names (layers.<global index>...), whatever the split."""
    return {stage.part.global_name(name): tensor for _, stage in stages
            for name, tensor in stage.part.state_dict().items() if not name.endswith("_extra_state")}


def load_stage_state_dict(stages, full: dict[str, torch.Tensor]) -> None:
    """Load global-named parameters (stage_state_dict's naming) into this rank's stages;
    megatron's per-Linear `_extra_state` placeholders stay as they are."""
    for _, stage in stages:
        current = stage.part.state_dict()
        stage.part.load_state_dict({name: value if name.endswith("_extra_state") else full[stage.part.global_name(name)]
                                    for name, value in current.items()})
