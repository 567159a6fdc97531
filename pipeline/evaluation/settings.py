"""The `eval` config section's settings objects for pipeline/evaluation's functions; its rules
are pipeline/config/rules.py `check_eval` (what they require and why is said here).

How the in-loop evaluation works under parallelism: it runs the whole model in each process
(streaming generation and the streamed loss are one-process code, model/generation), so it
needs every weight on every rank. Data parallelism (also ZeRO-1/2, whose weights are whole on
each rank) qualifies: the ranks split the PassKey cells and the held-out sequences and gather
the results. Tensor and pipeline parallelism and ZeRO-3 hold only shards; gathering a whole
model onto one rank mid-run would double its memory, so they are refused by the rules, before any
work, with what to do instead (evaluate saved checkpoints with `python -m pipeline.evaluate`).

Cost bound: one evaluation streams sum(passkey_lengths) x depths x trials prompt tokens plus
position_loss_length x sequences tokens through the model; check_eval refuses more than
eval.max_tokens, so the time an evaluation can take is known from the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config.tree import EvalConfig

if TYPE_CHECKING:  # the model code behind it is imported when an evaluation is built, not by validate()
    from pipeline.evaluation.passkey_eval import PassKeySettings


def passkey_settings(e: EvalConfig) -> PassKeySettings:
    from pipeline.evaluation.passkey_eval import PassKeySettings

    return PassKeySettings(list(e.passkey_lengths), list(e.passkey_depths), e.passkey_trials, e.passkey_seed,
                           e.passkey_batch_size, e.chunk_tokens)
