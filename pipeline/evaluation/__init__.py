"""Evaluation of a trained model (issue 15 items 2-4): PassKey retrieval, loss by position, and
the evaluator the training loop runs every eval.interval_steps.

    passkey.py        prompts (paper / depth formats), keys, scoring: pure functions
    passkey_eval.py   PassKey accuracy of a model over a length x depth grid (streaming generation)
    position_loss.py  mean loss per position bucket, streamed with the model's state
    codec.py          data_prep's tokenizers plus a decoder for generated answers
    plots.py          heat map and loss-by-position curve (PNG)
    reports.py        JSON + PNG files and the MLflow metric names
    settings.py       the `eval` config section's settings objects (its rules: pipeline/config/rules.py)
    in_loop.py        InLoopEvaluator: runs in pipeline/training/loop.py, logs to MLflow, resumes

Entry point: `python -m pipeline.evaluate passkey|position-loss` (pipeline/evaluate.py).
"""
