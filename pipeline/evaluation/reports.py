"""What an evaluation leaves behind: JSON results and PNG pictures in one folder, and the flat
metrics that go to MLflow.

    write_passkey(results, folder, title)        -> [passkey.json, passkey_heatmap.png]
    write_position_loss(result, folder, title)   -> [position_loss.json, position_loss.png]
    passkey_metrics(results) / position_loss_metrics(result)   -> {name: value}

Files are written to a temporary name and renamed into place (data_prep/manifest.py's atomic
JSON writer; pictures the same way), so a crash never leaves half a result that looks whole.
Metric names: `passkey/acc` (mean over the grid), `passkey/acc_L<length>` (mean over depths),
`passkey/acc_L<length>_d<percent>` per cell, `passkey/digits` (digit accuracy over the grid),
`position_loss/<start>-<end>` per bucket.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import write_json_atomic
from pipeline.evaluation.plots import passkey_heatmap, position_loss_curve

PASSKEY_FILES = ("passkey.json", "passkey_heatmap.png")
POSITION_LOSS_FILES = ("position_loss.json", "position_loss.png")


def write_passkey(results: dict, folder: Path, title: str = "") -> list[Path]:
    """passkey.json and (with matplotlib) the heat map; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(folder / PASSKEY_FILES[0]), results)
    picture = passkey_heatmap(results, folder / PASSKEY_FILES[1], title)
    return [folder / PASSKEY_FILES[0]] + ([picture] if picture else [])


def write_position_loss(result: dict, folder: Path, label: str = "model", title: str = "",
                        training_length: int | None = None) -> list[Path]:
    """position_loss.json and (with matplotlib) its curve; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(folder / POSITION_LOSS_FILES[0]), result)
    picture = position_loss_curve({label: result}, folder / POSITION_LOSS_FILES[1], title, training_length)
    return [folder / POSITION_LOSS_FILES[0]] + ([picture] if picture else [])


def passkey_metrics(results: dict) -> dict[str, float]:
    cells = results["cells"]
    metrics = {"passkey/acc": _mean(c["accuracy"] for c in cells),
               "passkey/digits": _mean(c["digit_accuracy"] for c in cells)}
    for length in results["lengths"]:
        metrics[f"passkey/acc_L{length}"] = _mean(c["accuracy"] for c in cells if c["length"] == length)
    for c in cells:
        metrics[f"passkey/acc_L{c['length']}_d{round(100 * c['depth'])}"] = c["accuracy"]
    return metrics


def position_loss_metrics(result: dict) -> dict[str, float]:
    return {f"position_loss/{b['start']}-{b['end']}": b["loss"] for b in result["buckets"]}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
