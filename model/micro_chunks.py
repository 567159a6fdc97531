"""Training one long sequence in micro-chunks, with the FAM state passed across them (issue 14).

FAM's state is O(1) in sequence length: per layer, the F FAM rows and the K/V of the last m
blocks (model/state.py, docs/fam.md "The algorithm"). So a sequence of any length can run micro-chunk by
micro-chunk, each a multiple of block_size, and only the states at the boundaries need keeping.

Exact mode: the gradients of one call over the whole sequence (loss = mean over all tokens).
    forward   s_0 = the given state (None: the soft-prompt stream and zero first residual);
              s_{i+1} = chunk_i(s_i) under no_grad, embedding and layers only (no output layer:
              the loss comes from the recompute). Kept: every s_i, and the tokens and labels.
    backward  for i = K-1 .. 0: recompute chunk_i from s_i as leaf tensors that require grad,
              back-propagate  w_i * loss_i + <s_{i+1}, g_{i+1}>  (w_i = chunk tokens / tokens,
              g_{i+1} the gradient of s_{i+1} handed back by chunk i+1); the leaves' .grad is g_i.
    The whole call's autograd graph is exactly these chunk graphs joined at the state tensors,
    so by the chain rule every parameter gradient is the whole call's, summed in another order.
    Peak memory: one chunk's graph, the K saved states and two states' gradients (offload_states:
    the saved states in host memory instead). Compute: one extra forward of every chunk but the
    last (the last one's forward is its recompute).
Truncated mode: each chunk starts from the previous chunk's state, detached, and back-propagates
    at once; no gradient crosses a boundary (gradients within a micro-chunk, state across, as in
    the pipeline-parallel schedule of issue 14). One forward per chunk, no saved states.

What a boundary keeps: the LayerState itself, F*b*h FAM rows plus 2*m*C*b*g*d memory K/V per
layer (with TP, this rank's g/tp groups; with SP, F/tp rows). The alternative, the layer inputs
of the last m*C tokens to recompute the K/V from, holds m*C*b*h per layer: h/(2*g*d) times the
K/V elements, 16x for the multi-query fam-24b, 0.5x for the multi-head fam-1b/8b. Under bf16
autocast the K/V are bf16 and the residual stream fp32, so in bytes 32x and 1x: never cheaper
there, and it would need a gradient handed into every layer inside the previous chunk's
recompute. `state_bytes` measures a state (fam-1b, micro-batch 1: 347 MB per boundary).

Shapes: tokens, labels [b, s]; a chunk is tokens[:, lo:hi]; states as in model/state.py.
"""

from __future__ import annotations

import torch

from model.language_model import FAMLanguageModel, ModelOutput
from model.state import FAMState, LayerState


def micro_chunked_forward_backward(  # shape: model.forward's arguments plus the three micro-chunk settings
    model: FAMLanguageModel,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    chunk_len: int,
    state: FAMState | None = None,
    position_offset=0.0,
    loss_scale: float = 1.0,
    truncated: bool = False,
    offload_states: bool = False,
) -> ModelOutput:
    """Forward and backward of `model` over tokens [b, s] in micro-chunks of chunk_len tokens
    (the last one may be shorter, ending in a partial block). Parameter gradients accumulate
    into .grad as `(loss_scale * loss).backward()` of one whole call would leave them (exact
    mode) or as the detaching loop does (truncated=True). `state` and `position_offset` (RPO:
    a float or [b]) mean what they mean for model.forward. offload_states (exact mode): the saved
    boundary states wait in host memory (pinned on a GPU machine) instead of the device. Returns ModelOutput(loss: the mean
    over all tokens, detached and unscaled; logits None; state: after the last token, detached)."""
    check_micro_chunks(model, tokens, labels, chunk_len, state)
    spans = chunk_spans(tokens.shape[1], chunk_len)
    if truncated:
        return _truncated(model, tokens, labels, spans, state, position_offset, loss_scale)
    return _exact(model, tokens, labels, spans, state, position_offset, loss_scale, offload_states)


def micro_chunked_loss(model: FAMLanguageModel, tokens: torch.Tensor, labels: torch.Tensor, chunk_len: int,
                       state: FAMState | None = None) -> torch.Tensor:
    """The mean loss over tokens [b, s] streamed micro-chunk by micro-chunk with the state, no
    gradients (validation of long sequences): one whole call's loss, with one chunk's
    activations alive at a time."""
    check_micro_chunks(model, tokens, labels, chunk_len, state)
    seq, total = tokens.shape[1], 0.0
    with torch.no_grad():
        for lo, hi in chunk_spans(seq, chunk_len):
            out = _chunk(model, tokens, labels, lo, hi, state, 0.0)
            total, state = total + out.loss * ((hi - lo) / seq), out.state
    return total


def check_micro_chunks(model: FAMLanguageModel, tokens, labels, chunk_len: int, state: FAMState | None = None) -> None:
    """Raise a ValueError naming the setting that micro-chunked training cannot serve. All
    before any work: a chunk refused halfway through the backward would leave partial .grad."""
    cfg = model.config
    if cfg.attention == "dense":
        raise ValueError(
            "model.attention='dense' has no O(1) state to pass across micro-chunks (every token attends to "
            "every earlier one): train dense models without micro-chunks, or use attention='fam'"
        )
    if not (model.pre_process and model.post_process):
        raise ValueError(
            "micro-chunked training needs the whole model on this rank (embedding to loss); a pipeline "
            "stage gets its micro-chunks from the schedule instead"
        )
    if chunk_len <= 0 or chunk_len % cfg.block_size:
        raise ValueError(
            f"micro_chunk_len={chunk_len} must be a positive multiple of model.block_size={cfg.block_size}: "
            "a micro-chunk may only end where a block ends"
        )
    if labels is None or labels.shape != tokens.shape:
        got = None if labels is None else tuple(labels.shape)
        raise ValueError(f"labels must have the shape of tokens {tuple(tokens.shape)}, got {got}")
    seq = tokens.shape[1]
    if seq == 0:
        raise ValueError("tokens hold no token: micro-chunked training needs a sequence of length >= 1")
    if state is not None and (state.ends_mid_block or state.position % cfg.block_size):
        raise ValueError(
            f"the given state (position {state.position}) ends in a partial block of model.block_size="
            f"{cfg.block_size} and cannot be continued"
        )
    tp = cfg.tensor_model_parallel_size
    last = seq - (len(chunk_spans(seq, chunk_len)) - 1) * chunk_len
    if cfg.sequence_parallel and (chunk_len % tp or last % tp):
        raise ValueError(
            f"with sequence parallelism every micro-chunk must be divisible by tensor_parallel_size={tp}: "
            f"micro_chunk_len={chunk_len}, last micro-chunk {last} tokens of a sequence of {seq}"
        )


def chunk_spans(seq: int, chunk_len: int) -> list[tuple[int, int]]:
    """[(lo, hi)] covering 0..seq in order; only the last may be shorter than chunk_len."""
    return [(lo, min(lo + chunk_len, seq)) for lo in range(0, seq, chunk_len)]


def state_bytes(state: FAMState | None) -> int:
    """Bytes of a state's tensors: what one micro-chunk boundary keeps."""
    return sum(t.numel() * t.element_size() for t in _tensors(state) if t is not None)


def _truncated(model, tokens, labels, spans, state, position_offset, loss_scale) -> ModelOutput:
    seq, total = tokens.shape[1], 0.0
    for lo, hi in spans:
        out = _chunk(model, tokens, labels, lo, hi, state, position_offset)
        weight = (hi - lo) / seq  # chunk means -> the mean over all tokens
        (out.loss * (weight * loss_scale)).backward()
        total = total + out.loss.detach() * weight
        state = out.state.detach()
    return ModelOutput(total, None, state)


def _exact(model, tokens, labels, spans, state, position_offset, loss_scale, offload=False) -> ModelOutput:
    seq, device = tokens.shape[1], tokens.device
    starts = [state]  # starts[i]: the state chunk i begins from (in host memory with offload, but the caller's)
    with torch.no_grad():
        current = state
        for lo, hi in spans[:-1]:
            current = _advance(model, tokens[:, lo:hi], current, position_offset)
            starts.append(_moved(current, torch.device("cpu")) if offload else current)
    total, final, grads = 0.0, None, None  # grads: d objective / d (state after this chunk)
    for i in reversed(range(len(spans))):
        lo, hi = spans[i]
        # Chunk 0 runs from the caller's state as given, so a state that requires grad gets it.
        start = starts[i] if i == 0 else _as_leaves(_moved(starts[i], device) if offload else starts[i])
        starts[i] = None  # the leaves hold the only reference now
        out = _chunk(model, tokens, labels, lo, hi, start, position_offset)
        weight = (hi - lo) / seq
        outputs, grad_outputs = [out.loss * (weight * loss_scale)], [None]
        for t, g in zip(_tensors(out.state), grads or []):
            if g is not None:
                outputs.append(t)
                grad_outputs.append(g)
        torch.autograd.backward(outputs, grad_outputs)
        total = total + out.loss.detach() * weight
        if final is None:  # the last chunk, the first one recomputed
            final = out.state.detach()
        grads = None if i == 0 else [None if t is None else t.grad for t in _tensors(start)]
    return ModelOutput(total, None, final)


def _chunk(model, tokens, labels, lo, hi, state, position_offset) -> ModelOutput:
    """One micro-chunk with grad, on the training path: the loss chunk by chunk, no logits."""
    piece, piece_labels = tokens[:, lo:hi], labels[:, lo:hi]
    return model(piece, labels=piece_labels, state=state, position_offset=position_offset, return_logits=False)


def _advance(model: FAMLanguageModel, tokens: torch.Tensor, state: FAMState | None, position_offset) -> FAMState:
    """The state after `tokens`: model.forward's path without the output layer, which the
    no-grad pass does not need (fam-1b, 256k vocabulary: a third of the layers' GEMM FLOPs).
    The checks model.forward makes on the state are made once by check_micro_chunks."""
    b, s = tokens.shape
    positions = model.positions(b, s, state, position_offset, tokens.device)
    _, layer_states = model.run_layers(model.embed(tokens), positions, state)
    position = (0 if state is None else state.position) + s
    return FAMState(layer_states, position, s % model.config.block_size != 0)


def _moved(state: FAMState, device: torch.device) -> FAMState:
    """The state's tensors on `device`. To the host: into pinned memory when a GPU exists, copied
    without waiting (the next chunk's forward overlaps the copy; the stream orders its reuse);
    back: a non-blocking copy from that pinned memory."""
    pin = device.type == "cpu" and torch.cuda.is_available()

    def move(t):
        if t is None:
            return None
        if device.type != "cpu":
            return t.to(device, non_blocking=True)
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t, non_blocking=pin)

    layers = [LayerState(move(s.fam), move(s.mem_k), move(s.mem_v)) for s in state.layers]
    return FAMState(layers, state.position, state.ends_mid_block)


def _as_leaves(state: FAMState) -> FAMState:
    """The same state as fresh leaf tensors that require grad: where chunk i's backward stops
    and its .grad is handed to chunk i - 1."""

    def leaf(t):
        return None if t is None else t.detach().requires_grad_(True)

    layers = [LayerState(leaf(s.fam), leaf(s.mem_k), leaf(s.mem_v)) for s in state.layers]
    return FAMState(layers, state.position, state.ends_mid_block)


def _tensors(state: FAMState | None) -> list:
    """fam, mem_k, mem_v of every layer in order, None where absent (alignment is by index)."""
    if state is None:
        return []
    return [t for s in state.layers for t in (s.fam, s.mem_k, s.mem_v)]
