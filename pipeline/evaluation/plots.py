"""The evaluation pictures: a PassKey length x depth heat map and a loss-by-position curve.

Both are PNGs written with matplotlib's Agg backend (no display on training nodes) through a
temporary file renamed into place, so a reader never sees half an image. Without matplotlib
(the GPU image has none) they return None with a warning: the JSON beside them holds every
number, and `python -m benchmarks.passkey_repro --report` draws them again elsewhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("famtron")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no evaluation pictures (the JSON results are written)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
    return path


def passkey_heatmap(results: dict, path: Path, title: str = "") -> Path | None:
    """Accuracy per cell: lengths on x (log-spaced labels), depths on y (0 % at the top: key first)."""
    plt = _pyplot()
    if plt is None:
        return None
    lengths, depths = results["lengths"], results["depths"]
    grid = {(c["length"], c["depth"]): c["accuracy"] for c in results["cells"]}
    values = [[grid.get((n, d), float("nan")) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.45 * len(depths) + 1.8))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{round(100 * d)} %" for d in depths])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="prompt length (tokens)", ylabel="key depth", title=title or "PassKey accuracy (%)")
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def position_loss_curve(curves: dict[str, dict], path: Path, title: str = "",
                        training_length: int | None = None) -> Path | None:
    """Loss per position bucket (log position axis) for one or more models ({label: result}),
    with each model's BSWA receptive field and the training length marked."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, result) in enumerate(curves.items()):
        mids = [max(0.5, (b["start"] + b["end"] - 1) / 2) for b in result["buckets"]]
        line = ax.plot(mids, [b["loss"] for b in result["buckets"]], "o-", ms=3, label=label)[0]
        field = result.get("receptive_field")
        if field:
            ax.axvline(field, color=line.get_color(), ls="--", alpha=0.7,
                       label=f"{label}: BSWA receptive field {_tokens(field)}")
    if training_length:
        ax.axvline(training_length, color="grey", ls=":", label=f"training length {_tokens(training_length)}")
    ax.set_xscale("log")
    ax.set(xlabel="position (tokens)", ylabel="mean loss (nats/token)", title=title or "loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
