"""Loads famtron_python.jsonl (beside this file) for lm-eval's `custom_dataset`, so the task
needs no download and works from any working directory."""

from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "famtron_python.jsonl"


def load(**_metadata) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(DATA))})
