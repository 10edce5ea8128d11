"""Per-epoch training history: ``history.csv`` (rewritten atomically each epoch) and the studies'
accuracy-vs-epoch and loss-vs-epoch plots."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Any

from covidscan.runtime import atomic_path

HISTORY_COLUMNS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "lr", "seconds")


def write_history(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write all rows (temp file + rename): a crash mid-write never loses earlier epochs. Columns a
    callback adds (``Callback.epoch_metrics``) follow the standard ones."""
    extra = extra_columns(rows)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*HISTORY_COLUMNS, *extra], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return [
            {key: float(value) if value not in ("", None) else math.nan for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


def extra_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns callbacks added to the rows (``Callback.epoch_metrics``), in order of appearance."""
    return [key for key in dict.fromkeys(key for row in rows for key in row) if key not in HISTORY_COLUMNS]


def plot_history(rows: list[dict[str, Any]], plot_dir: str | Path) -> list[Path]:
    """``accuracy.png`` and ``loss.png``: train vs validation per epoch, phase changes dashed; and
    ``callback_metrics.png`` with the columns callbacks added (e.g. domain-adversarial training's)."""
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, label in (("accuracy", "Accuracy"), ("loss", "Loss")):
        curves = {
            "train": [row[metric] for row in rows],
            "validation": [row.get(f"val_{metric}", math.nan) for row in rows],
        }
        written.append(_plot_curves(rows, curves, label, f"{label} vs epoch", plot_dir / f"{metric}.png"))
    extra = extra_columns(rows)
    if extra:
        curves = {key: [row.get(key, math.nan) for row in rows] for key in extra}
        written.append(
            _plot_curves(rows, curves, "Value", "Callback metrics vs epoch", plot_dir / "callback_metrics.png")
        )
    return written


def _plot_curves(
    rows: list[dict[str, Any]], curves: dict[str, list[float]], ylabel: str, title: str, path: Path
) -> Path:
    """One line per curve that has any value, against the epoch; phase changes dashed."""
    from covidscan.plotting import new_figure, save_figure

    epochs = [row["epoch"] for row in rows]
    fig = new_figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for name, values in curves.items():
        if any(not math.isnan(v) for v in values):
            ax.plot(epochs, values, marker="o", label=name)
    for prev, row in itertools.pairwise(rows):
        if row["phase"] != prev["phase"]:
            ax.axvline(row["epoch"] - 0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=100)
