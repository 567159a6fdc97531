"""The fast FAM scan: one autograd node for a layer's whole scan (all T blocks), issue 13.

model/scan.py's eager scan calls `fam_step` once per block under autograd: T autograd nodes per
layer, each producing a weight-sized gradient per weight (a GEMM with K = F rows) that autograd
then adds up, T times per weight and layer. `FAMScan` instead:
  - forward: runs the T steps of model/scan_step.py without autograd over one keys/values buffer
    per block ([F + C, b, g, d]: the step writes the FAM keys into rows :F), keeping each step's
    activations (`Activations`, F rows per block); it returns the block attention's keys and
    values [R + S, b, g, d] whole: the buffers' first F rows of every block, zeros up to R (T*F
    padded to a tile, model/masks.py), then k or v, so the layer concatenates nothing, and
    saves these instead of k and v (v is a view that would keep the whole QKV output alive);
  - backward: walks the blocks in reverse over the kept activations (it recomputes nothing) and
    the keys/values buffers the forward wrote (held for it where no layer recompute follows:
    `_take_blocks`) and back-propagates activation gradients only (to the previous FAM, to the block's K/V, to the
    initial FAM: the prompt rows or a passed-in state), writing each weight use's output gradient;
    the block attention's gradients of k and v arrive through the joined keys/values and are added
    to the steps' in one pass (autograd would add a copy of the static buffer to them);
    after the loop each weight's gradient is ONE GEMM over all T*F*b rows (norm weights: one
    sum), as cuDNN's RNNs do.
The soft-prompt stream's step (the prompt rows attending among themselves, model/layer.py) is a
step over no block, run inside the same node so its weight uses join the same GEMMs. A partial
last block is padded to C with masked keys (model/scan_step.py `key_bias`), so it runs the same
compiled step as the others, on any length.

On CUDA each step is torch.compile'd (one graph for every block and layer, one for the prompt
step), and each layer's whole loop, forward and backward, replays as one CUDA graph over static
buffers shared by all layers (model/scan_graphs.py; not under tensor parallelism, whose
collectives run uncaptured); weights already in the GEMM dtype are read in place, by each layer's
own graphs (WEIGHTS_IN_PLACE); each call's kept activations and keys/values buffers stay in its own
slots from the forward to the backward (model/scan_slots.py). On CPU the same code runs uncompiled,
over fresh buffers or (tests) the static ones; tests/test_scan.py checks it against the eager
per-step autograd scan. Under layer recompute, model.recompute_fam_scan = false keeps the scan's
outputs and activations from the forward instead of running the scan again in backward
(model/scan_stash.py).

Kept vs recomputed activations: per step the backward reads 8 tensors of F rows (fam-1b: 6.3 MB
per block and layer, bf16 and fp32; a block's 1024 tokens keep ~25x that) instead of re-running
the step's four GEMMs, whose F-row products each read all the layer's weights (132 MB in bf16,
~31 us on an H200), and their ~15 other kernels. fam-1b at 8k without layer recompute keeps
~1 GB more for it (18 layers x 9 steps).
Measured on one H200 (benchmarks.train_step --profile, bf16, micro-batch 1, vocab 32k), fam-1b
at 8k tokens (bswa-1b: 40.2k tokens/s, 96 % busy, 2,397 kernels, 195 ms, measured with the
first version):
  first version (compiled steps uncaptured, recompute in backward, fp32 attention products):
      19.5k tokens/s, GPU busy 63 %, 12,334 kernels and 266 ms of kernels per step;
  this version: 30.9k tokens/s (0.77x bswa-1b), 92 % busy, 10,462 kernels, 243 ms, peak 42.7 GiB.
At 64k the first version ran 23.6k tokens/s (bswa-1b 33.4k, 88,696 kernels, 2,551 ms).
Under bf16-mixed, one run (benchmarks/results/2026-11-30-2xH200): 32.8k, 36.5k, 27.8k and 27.2k
tokens/s at 8k, 32k, 64k and 128k, 0.76-0.80x bswa-1b. The scan's own kernels at 8k: 13 ms
forward, 18 ms backward, about 2.5x the time to read the weights once per step and direction.
Autotuned steps (COMPILE_MODE below) did not change that. With `_scales`' host copy gone (2026-11-30,
"Session 11"): 39.1k tokens/s at 8k (0.79x bswa-1b in the same process, GPU 91 % busy, 191 against
152 ms of kernels); with layer recompute keeping the scan (model/scan_stash.py) 36.1k at 64k and
35.8k at 128k. With the weights read in place ("Session 12"): 40.2k, 44.7k, 36.4k and 36.0k at 8k to
128k, 0.79-0.84x bswa-1b in the same runs, against a floor of 0.93-0.94x set by the steps' weight
reads and FAM's FLOPs outside the scan (benchmarks/fam_floor.py): the scan's other kernels, not its
reads, are most of the gap. With flash attention in the steps and the block loads in one compiled
write ("Session 14"): 0.79x at 8k, micro-batch 1; 0.88x at micro-batch 4; 0.89x at micro-batch 2
from 32k to 128k. With the keys/values buffers held and the steps' combo kernels (2026-12-02,
"Session 21"): 0.896x at 8k, micro-batch 4, and 0.906x at 32k, micro-batch 2, in one run; 0.897x, 0.901x,
0.899x and 0.901x at 8k to 128k in "Session 22", where the scan's own steps were 47 of the 57 ms a step
(at 8k) that fam-1b's kernels take beyond bswa-1b's.
"""

from __future__ import annotations

import functools

import torch

from model import scan_buffers, scan_graphs, scan_stash
from model.compile_limits import bounded_compiles
from model.scan_buffers import ScanSpec
from model.scan_first_step import step_backward_first, step_forward_first
from model.scan_step import Activations, step_backward, step_forward, weight_gradients


# How the CUDA scan steps are compiled: COMBO_KERNELS (torch.compile's default mode with inductor's
# combo_kernels: independent pointwise kernels of a step, such as its two K/V gradient copies, launched
# as one), None (torch.compile's default, before 2026-12-02) or a torch.compile mode. Measured on one
# H200 (fam-1b, 8k tokens, micro-batch 4, benchmarks/results/2026-12-02-1xH200, "Session 21"): 8,227
# kernels a step against 9,163, FAM's own kernels 56.0 against 59.1 ms, 0.890 of bswa-1b's tokens/s
# against 0.886. "max-autotune-no-cudagraphs" (Triton GEMM templates that can take a step's
# elementwise work into their epilogues) made no difference ("Session 10"). `benchmarks.train_step
# --scan-compile-mode` sets it; model/scan_graphs.py captures any. Set it before the first scan runs.
COMBO_KERNELS = "combo-kernels"
COMPILE_MODE: str | None = COMBO_KERNELS


# The forward's keys/values buffers held for the backward where it runs without recompute
# (`_take_blocks`); False loads them again in the backward, as before 2026-12-02
# (`benchmarks.train_step --scan-blocks reloaded`, to measure the two).
HOLD_BLOCKS = True


# Where the weights are already in the GEMM dtype, each layer's captured loops read them in place
# (model/scan_graphs.py); False copies them into the shared buffers as for fp32 weights
# (`benchmarks.train_step --scan-weights copied`, to measure the two in one run).
WEIGHTS_IN_PLACE = True


@functools.lru_cache(maxsize=8)
def _compiled(fn, fullgraph: bool, mode: str | None = None):
    # fullgraph where there are no collectives: a graph break would be a silent slow path, and
    # past the shape budget it raises instead of running eagerly.
    if mode == COMBO_KERNELS:
        return torch.compile(fn, dynamic=False, fullgraph=fullgraph, options={"combo_kernels": True})
    return torch.compile(fn, dynamic=False, fullgraph=fullgraph, mode=mode)


def _step_functions(device: torch.device, spec: ScanSpec):
    if device.type != "cuda":
        return step_forward, step_backward
    fullgraph = spec.enter is None
    # combo kernels only where measured: one graph per step (TP = 1); the steps of tensor parallelism, split at
    # their collectives, keep torch.compile's default, as the 2-GPU parity suite last checked them
    mode = None if COMPILE_MODE == COMBO_KERNELS and not fullgraph else COMPILE_MODE
    return _compiled(step_forward, fullgraph, mode), _compiled(step_backward, fullgraph, mode)


# From the prompt at tensor-parallel size 1, block 0's step and the prompt step run as one
# (model/scan_first_step.py): one QKV GEMM, the projection and FFN over both steps' rows. False: two steps.
# On one H200 (fam-1b, 8k, micro-batch 4, cuDNN steps, "Session 24") it made no difference: 50.35k tokens/s
# merged, 50.36k separate, so it stays off (`benchmarks.train_step --scan-first-step merged`). Set it
# before the first scan runs: captured loops (model/scan_graphs.py) keep what they captured.
MERGED_FIRST_STEP = False


def _merges_first_step(spec: ScanSpec) -> bool:
    return MERGED_FIRST_STEP and spec.from_prompt and spec.enter is None


def _first_step_functions(device: torch.device, spec: ScanSpec):
    if device.type != "cuda":
        return step_forward_first, step_backward_first
    return _compiled(step_forward_first, True, COMPILE_MODE), _compiled(step_backward_first, True, COMPILE_MODE)


def _slot(group, i: int):
    return type(group)(*(t[i] for t in group))


# ---- the two loops, over a dict of buffers (fresh, or model/scan_graphs.py's static ones) ----


def _bias(b: dict, t: int, partial: bool):
    """Block t's key bias, or None where no key is masked (every block but a partial last one):
    the step then runs flash attention on GPU (model/scan_step.py `uses_flash`)."""
    return b["bias"][t] if partial and t == b["keys"].shape[0] - 1 else None


def _first_step_args(partial: bool, b: dict) -> tuple:
    """The arguments block 0's step and the prompt step share in model/scan_first_step.py."""
    tables = tuple(x[0] for x in b["rope"])
    return (b["keys"][0], b["values"][0], _bias(b, 0, partial), b["prompt_keys"], b["prompt_values"], tables,
            (b["scales"][0], b["scales"][1]), b["weights"])


def _forward_loop(spec: ScanSpec, partial: bool, b: dict):
    """All T steps and the prompt step; returns (F_T, prompt stream output or None). partial: the
    last block is shorter than C (its padding keys masked)."""
    step, _ = _step_functions(b["keys"].device, spec)
    cos_q, sin_q, cos_k, sin_k = b["rope"]
    first, rest = b["scales"][0], b["scales"][1]
    fam, prompt_out, merged = b["fam0"], None, _merges_first_step(spec)
    for t in range(b["keys"].shape[0]):
        if t == 0 and merged:
            first_step, _ = _first_step_functions(b["keys"].device, spec)
            fam, prompt_out = first_step(fam, *_first_step_args(partial, b), _slot(b["saved"], 0),
                                         _slot(b["saved"], -1), *spec.config()[:4])
            continue
        fam = step(fam, b["keys"][t], b["values"][t], _bias(b, t, partial), cos_q[t], sin_q[t], cos_k[t], sin_k[t],
                   first if t == 0 else rest, b["weights"], _slot(b["saved"], t), *spec.config())
    if spec.from_prompt and not merged:
        prompt_out = step(b["fam0"], b["prompt_keys"], b["prompt_values"], None, cos_k[0], sin_k[0], cos_k[0],
                          sin_k[0], rest, b["weights"], _slot(b["saved"], -1), *spec.config())
    return fam, prompt_out


def _backward_loop(spec: ScanSpec, partial: bool, b: dict):
    """The steps in reverse; returns the gradient of the initial FAM."""
    _, step = _step_functions(b["keys"].device, spec)
    cos_q, sin_q, cos_k, sin_k = b["rope"]
    first, rest = b["scales"][0], b["scales"][1]
    T, F = b["keys"].shape[0], cos_q.shape[1]
    d, merged = b["d_fam"], _merges_first_step(spec)
    for t in reversed(range(T)):
        rows = slice(t * F, (t + 1) * F)
        if t == 0 and merged:
            _, first_step = _first_step_functions(b["keys"].device, spec)
            return first_step(d, b["d_prompt"], b["d_fam_k"][rows], b["d_fam_v"][rows], *_first_step_args(partial, b),
                              _slot(b["saved"], 0), _slot(b["saved"], -1), _slot(b["grads"], 0),
                              _slot(b["grads"], -1), b["d_keys"][0], b["d_values"][0], *spec.config()[:4])
        d = step(d, b["d_fam_k"][rows], b["d_fam_v"][rows], b["keys"][t], b["values"][t], _bias(b, t, partial),
                 cos_q[t], sin_q[t], cos_k[t], sin_k[t], first if t == 0 else rest, b["weights"], _slot(b["saved"], t),
                 _slot(b["grads"], t), b["d_keys"][t], b["d_values"][t], *spec.config())
    if spec.from_prompt:
        d = d + step(b["d_prompt"], None, None, b["prompt_keys"], b["prompt_values"], None, cos_k[0], sin_k[0],
                     cos_k[0], sin_k[0], rest, b["weights"], _slot(b["saved"], -1), _slot(b["grads"], -1), None, None,
                     *spec.config())
    return d


# ---- the autograd node ----


def _reads_weights_in_place(spec: ScanSpec, weights) -> bool:
    """Whether the captured loops can read the layer's weights where they are: matrices already in
    the GEMM dtype, all contiguous, and not DeepSpeed ZeRO-3's (gathered into a new buffer at each
    use, `ds_id`), whose addresses would make a new loop per call."""
    matrices = (weights[1], weights[2], weights[4], weights[5])
    return (WEIGHTS_IN_PLACE and all(w.dtype == spec.dtype for w in matrices)
            and all(w.is_contiguous() and not hasattr(w, "ds_id") for w in weights))


def _static_scan(spec: ScanSpec, fam_shape, fam_dtype, k, rope, weights):
    """(model/scan_graphs.py's StaticScan for these shapes, or None (another device, collectives);
    whether its loops read the weights in place)."""
    if spec.enter is not None or not scan_graphs.uses_static_buffers(k.device):
        return None, False
    in_place = _reads_weights_in_place(spec, weights)
    key = (spec.block_size, spec.from_prompt, spec.fam_rows, spec.eps, spec.groups, spec.head_dim, spec.dtype,
           tuple(fam_shape), fam_dtype, tuple(k.shape[1:]),
           k.shape[0] % spec.block_size != 0, k.dtype, str(k.device), tuple(rope[0].shape),
           rope[0].dtype, tuple((tuple(w.shape), w.dtype) for w in weights), in_place)
    return scan_graphs.static_scan(key, k.device), in_place


def _constants(spec: ScanSpec, k, rope) -> dict:
    """The inputs that depend only on the shapes: the residual scales and the key bias of a partial
    last block (model/scan_buffers.py)."""
    T, F, S = rope[0].shape[0], rope[0].shape[1], k.shape[0]
    return dict(scales=scan_buffers.scales(k.device, spec.from_prompt),
                bias=scan_buffers.key_bias(T, F, spec.block_size, S, k.device))


# shape: the loop's inputs by name, plus what sizes the buffers made on first use
def _buffers(spec: ScanSpec, static, inputs: dict, weights, k, rope, fam0_like, backward: bool,
             in_place: bool = False) -> dict:
    """The loop's buffers holding this call's inputs: fresh ones around the inputs themselves, or
    the static ones (made on first use) with the inputs copied in (the weights too, unless the
    loops read them in place). The static buffers get the constant inputs (`_constants`) only when
    made or last loaded for another sequence length: every layer's call and both directions read the
    same ones, so building and copying them (6 launches a call) is not repeated."""
    if static is None:
        inputs = dict(inputs, **_constants(spec, k, rope))
        if backward:  # the forward's kept activations come in, and its keys/values buffers unless rebuilt
            made = scan_buffers.backward_outputs(spec, k, rope, weights)
            if "keys" not in inputs:
                made.update(scan_buffers.block_buffers(spec, k, rope))
        else:
            made = scan_buffers.forward_outputs(spec, fam0_like, k, rope, weights)
        return dict(inputs, weights=scan_buffers.gemm_dtype(weights, spec.dtype), **made)
    b = static.buffers
    if not b:
        b.update(scan_buffers.input_buffers(spec, fam0_like, k, rope, weights, in_place),
                 **scan_buffers.forward_outputs(spec, fam0_like, k, rope, weights))
    if backward and "grads" not in b:
        grads_in = {name: torch.empty_like(x) for name, x in inputs.items() if name.startswith("d_")}
        b.update(grads_in, **scan_buffers.backward_outputs(spec, k, rope, weights))
    if static.constants != k.shape[0]:  # S decides the key bias; the shape key, the rest (`_static_scan`)
        scan_buffers.copy_into(b, _constants(spec, k, rope))
        static.constants = k.shape[0]
    scan_buffers.copy_into(b, inputs if in_place else dict(inputs, weights=weights))
    return b


class FAMScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: ScanSpec, fam0, k, v, cos_q, sin_q, cos_k, sin_k, *weights):
        """fam0 [F, b, h]; k, v [S, b, g, d]; RoPE tables [T, F, b, 1, d] (FAM queries at each
        block's last F positions, FAM keys at the F before it); weights: norm1, qkv, proj, norm2,
        fc1, fc2. Returns F_T [F, b, h], the block attention's keys and values [R + S, b, g, d] (the
        FAM K/V padded to R rows, then k or v: `scan_buffers.join`) and, from the prompt, the prompt
        stream's output [F, b, h]. In a layer recompute that keeps the scan (model/scan_stash.py),
        the first run's outputs and activations instead of running again."""
        rope = (cos_q, sin_q, cos_k, sin_k)
        keep = any(ctx.needs_input_grad)
        stash, replaying = scan_stash.current()
        blocks = ()  # the loop's keys/values buffers, kept for the backward (not under a stash: recompute)
        if replaying:  # the stash's own copies, handed over; it keeps the FAM rows of the keys/values only
            (fam, fam_k, fam_v, *prompt_out), saved, prompt_kv = stash.entries.popleft()
            outputs = (fam, scan_buffers.join(fam_k, k), scan_buffers.join(fam_v, v), *prompt_out)
        else:
            hold = stash is None and HOLD_BLOCKS
            outputs, saved, prompt_kv, blocks = _run_forward(spec, fam0, k, v, rope, weights, keep, hold)
            if stash is not None:  # copies: what the first run returns may be changed in place before the recompute
                rows = (outputs[0], outputs[1][: spec.fam_rows], outputs[2][: spec.fam_rows], *outputs[3:])
                stash.entries.append((tuple(x.detach().clone() for x in rows), saved, prompt_kv))
        ctx.spec, ctx.kept_blocks = spec, bool(blocks)
        if keep:  # the joined keys/values, not k and v: v is a view that would keep the whole QKV output
            ctx.save_for_backward(outputs[1], outputs[2], *rope, *weights, *saved, *prompt_kv, *blocks)
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_fam, d_keys, d_values, *d_prompt_out):
        """d_keys, d_values [R + S, b, g, d]: the FAM rows' gradients go into the steps, the block rows' are
        added to the steps' own gradients of k and v (one add, no copy out of the static buffers). The
        steps read the keys/values buffers the forward's loop wrote, where it kept them (`_take_blocks`);
        else (under recompute) they are loaded again from k, v and the FAM rows."""
        spec, R = ctx.spec, ctx.spec.fam_rows
        keys, values, *rest = ctx.saved_tensors
        k, v = keys[R:], values[R:]
        rope, weights, saved = tuple(rest[:4]), tuple(rest[4:10]), Activations(*rest[10:19])
        blocks = tuple(rest[-2:]) if ctx.kept_blocks else ()
        S = k.shape[0]
        static, in_place = _static_scan(spec, saved.fam.shape[1:], saved.fam.dtype, k, rope, weights)
        slot = static.slots.find(saved) if static is not None else None
        held = static.blocks.find(blocks) if static is not None and blocks else None
        inputs = dict(rope=rope, d_fam=d_fam, d_fam_k=d_keys[:R], d_fam_v=d_values[:R])
        if slot is None:  # the activations are not where the forward's loop left them: copied in
            inputs["saved"] = saved
        if static is None and blocks:  # the forward's own (fresh) keys/values buffers
            inputs.update(keys=blocks[0], values=blocks[1])
        if spec.from_prompt:
            inputs.update(prompt_keys=rest[19], prompt_values=rest[20], d_prompt=d_prompt_out[0])
        b = _buffers(spec, static, inputs, weights, k, rope, saved.fam[0], backward=True, in_place=in_place)
        if static is not None:
            b = static.buffers_for(slot, held)
        if held is None and "keys" not in inputs:
            scan_buffers.load_blocks(b, k, v, keys[:R], values[:R])
        partial = S % spec.block_size != 0
        with torch.autocast(k.device.type, enabled=False), bounded_compiles("the FAM scan (model/fast_scan.py)"):
            if static is None:
                d = _backward_loop(spec, partial, b)
            else:
                loop = functools.partial(_backward_loop, spec, partial)
                d = static.loop("backward", loop, weights if in_place else None, slot, held)()
        own = torch.clone if static is not None else (lambda x: x)
        d_k, d_v = scan_buffers.add_block_rows(d_keys[R:], d_values[R:], b["d_keys"], b["d_values"])
        grads = weight_gradients(b["saved"], b["grads"], weights)  # before any other replay
        return (None, own(d).to(saved.fam.dtype), d_k, d_v, None, None, None, None, *grads)


def _run_forward(spec: ScanSpec, fam0, k, v, rope, weights, keep: bool, hold_blocks: bool):
    """The scan's forward loop: ((F_T, keys, values [R + S][, prompt stream output]), the steps' kept
    activations and the prompt step's K/V (empty unless `keep`), and (`keep` and `hold_blocks`) the
    loop's keys/values buffers for the backward, all owned by the caller."""
    F, S = rope[0].shape[1], k.shape[0]
    static, in_place = _static_scan(spec, fam0.shape, fam0.dtype, k, rope, weights)
    inputs = dict(fam0=fam0, rope=rope)
    b = _buffers(spec, static, inputs, weights, k, rope, fam0, backward=False, in_place=in_place)
    slot = _take_slot(spec, static, in_place, keep, fam0, k, rope, weights)
    held = _take_blocks(spec, static, in_place, keep and hold_blocks, k, rope, weights)
    if static is not None:
        b = static.buffers_for(slot, held)
    scan_buffers.load_blocks(b, k, v)
    partial = S % spec.block_size != 0
    with torch.autocast(k.device.type, enabled=False), bounded_compiles("the FAM scan (model/fast_scan.py)"):
        if static is None:
            fam, prompt_out = _forward_loop(spec, partial, b)
        else:
            loop = functools.partial(_forward_loop, spec, partial)
            loop = static.loop("forward", loop, weights if in_place else None, slot, held)
            fam, prompt_out = loop()
    own = torch.clone if static is not None else (lambda x: x)  # nothing static leaves
    keys, values = scan_buffers.join_blocks(b["keys"], b["values"], k, v, F, spec.fam_rows)
    outputs = (own(fam), keys, values) + ((own(prompt_out),) if spec.from_prompt else ())
    if not keep:
        return outputs, (), (), ()
    prompt_kv = (own(b["prompt_keys"]), own(b["prompt_values"])) if spec.from_prompt else ()
    saved = static.slots[slot].lend() if slot is not None else tuple(own(x) for x in b["saved"])
    if held is not None:
        blocks = tuple(static.blocks[held].lend())
    else:  # fresh buffers are this call's own; the shared static ones are written by the next call
        blocks = (b["keys"], b["values"]) if static is None and hold_blocks else ()
    return outputs, tuple(saved), prompt_kv, blocks


def _take_slot(spec: ScanSpec, static, in_place: bool, keep: bool, fam0, k, rope, weights) -> int | None:
    """The slot (model/scan_slots.py) this call's loop keeps its activations in, where they stay
    for the backward; None: the shared buffers (no static buffers, or nothing to keep, or no slot
    left), cloned out if kept."""
    if static is None or not keep:
        return None
    owner = scan_graphs.weights_key(weights) if in_place else None
    return static.slots.take(owner, lambda: scan_buffers.kept_buffers(spec, fam0, k, rope, weights))


def _take_blocks(spec: ScanSpec, static, in_place: bool, hold: bool, k, rope, weights) -> int | None:
    """The slot (model/scan_slots.py) whose keys/values buffers [T, F + C, b, g, d] this call's loops
    run over, so that the backward reads the block K/V and FAM K/V where the forward's loop wrote
    them instead of loading them again (fam-1b at 8k, micro-batch 4, H200: 36 writes, 1.84 ms a
    step in "Session 21"; 3.6 ms on another host in "Session 16"). None: the shared buffers (no
    static buffers, nothing to keep, no slot left, or under recompute, where holding them would keep
    every layer's block K/V from its forward to its backward). Where the block attention saves its
    keys/values anyway (no recompute) this holds another copy of them: fam-1b at 8k, micro-batch 4,
    0.2 GB a layer."""
    if static is None or not hold:
        return None
    owner = scan_graphs.weights_key(weights) if in_place else None
    return static.blocks.take(owner, lambda: scan_buffers.Blocks(**scan_buffers.block_buffers(spec, k, rope)))


def fast_scan(spec: ScanSpec, fam0, k, v, rope, weights):
    """(F_T, keys [R + S, b, g, d], values, prompt stream output or None); see FAMScan.forward."""
    out = FAMScan.apply(spec, fam0, k, v, *rope, *weights)
    return out[0], out[1], out[2], (out[3] if spec.from_prompt else None)
