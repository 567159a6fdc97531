"""The `eval` config section's rules (`validate_eval`, called from config_checks.validate) and
its settings objects for pipeline/evaluation's functions.

How the in-loop evaluation works under parallelism: it runs the whole model in each process
(streaming generation and the streamed loss are one-process code, model/generation), so it
needs every weight on every rank. Data parallelism (also ZeRO-1/2, whose weights are whole on
each rank) qualifies: the ranks split the PassKey cells and the held-out sequences and gather
the results. Tensor and pipeline parallelism and ZeRO-3 hold only shards; gathering a whole
model onto one rank mid-run would double its memory, so they are refused here, before any
work, with what to do instead (evaluate saved checkpoints with `python -m pipeline.evaluate`).

Cost bound: one evaluation streams sum(passkey_lengths) x depths x trials prompt tokens plus
position_loss_length x sequences tokens through the model; validate_eval refuses more than
eval.max_tokens, so the time an evaluation can take is known from the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config.tree import Config, EvalConfig

if TYPE_CHECKING:  # the model code behind it is imported when an evaluation is built, not by validate()
    from pipeline.evaluation.passkey_eval import PassKeySettings


def eval_tokens(e: EvalConfig) -> int:
    """Tokens one evaluation streams through the model (PassKey prompts + held-out sequences)."""
    passkey = sum(e.passkey_lengths) * len(e.passkey_depths) * e.passkey_trials
    position = e.position_loss_length * e.position_loss_sequences if e.position_loss_manifest else 0
    return passkey + position


def validate_eval(cfg: Config) -> None:
    """Raise ValueError naming the eval.* key(s) of the first rule broken. One clause per rule."""
    e, p = cfg.eval, cfg.parallel
    if e.interval_steps < 0:
        raise ValueError(f"eval.interval_steps={e.interval_steps}: must be >= 0 (0: only at the end)")
    if not e.enabled:
        return
    if p.tensor_parallel_size > 1 or p.pipeline_parallel_size > 1:
        raise ValueError(
            f"eval.enabled=true with parallel.tensor_parallel_size={p.tensor_parallel_size} and "
            f"parallel.pipeline_parallel_size={p.pipeline_parallel_size}: the in-loop evaluation runs the whole model "
            "in each process and TP/PP ranks hold only shards of it; set eval.enabled=false and evaluate the "
            "checkpoints with python -m pipeline.evaluate (it loads any layout as one model)")
    if p.zero_stage == 3:
        raise ValueError("eval.enabled=true with parallel.zero_stage=3: ZeRO-3 partitions the weights over the ranks "
                         "and the in-loop evaluation needs them whole; use zero_stage <= 2, or set "
                         "eval.enabled=false and evaluate the checkpoints with python -m pipeline.evaluate")
    if not e.passkey_lengths and not e.position_loss_manifest:
        raise ValueError("eval.enabled=true but there is nothing to evaluate: set eval.passkey_lengths and/or "
                         "eval.position_loss_manifest")
    if any(n < 1 for n in e.passkey_lengths):
        raise ValueError(f"eval.passkey_lengths={e.passkey_lengths}: lengths are token counts >= 1")
    if e.passkey_lengths and (not e.passkey_depths or any(not 0 <= d <= 1 for d in e.passkey_depths)):
        raise ValueError(f"eval.passkey_depths={e.passkey_depths}: give fractions in [0, 1] (0: key first)")
    for key in ("passkey_trials", "passkey_batch_size", "position_loss_length", "position_loss_sequences",
                "position_loss_buckets", "chunk_tokens", "max_tokens"):
        if getattr(e, key) < 1:
            raise ValueError(f"eval.{key}={getattr(e, key)}: must be >= 1")
    if e.chunk_tokens % cfg.model.block_size:
        raise ValueError(f"eval.chunk_tokens={e.chunk_tokens}: must be a multiple of model.block_size="
                         f"{cfg.model.block_size} (the state is carried across whole blocks)")
    if eval_tokens(e) > e.max_tokens:
        raise ValueError(
            f"one evaluation would stream {eval_tokens(e):,} tokens (sum(eval.passkey_lengths) x depths x "
            f"eval.passkey_trials + eval.position_loss_length x eval.position_loss_sequences), over "
            f"eval.max_tokens={e.max_tokens:,}: evaluate fewer lengths, depths, trials or sequences, or raise the bound")


def passkey_settings(e: EvalConfig) -> PassKeySettings:
    from pipeline.evaluation.passkey_eval import PassKeySettings

    return PassKeySettings(list(e.passkey_lengths), list(e.passkey_depths), e.passkey_trials, e.passkey_seed,
                           e.passkey_batch_size, e.chunk_tokens)
