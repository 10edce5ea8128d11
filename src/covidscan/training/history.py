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
    extra = [key for key in dict.fromkeys(key for row in rows for key in row) if key not in HISTORY_COLUMNS]
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


def plot_history(rows: list[dict[str, Any]], plot_dir: str | Path) -> list[Path]:
    """``accuracy.png`` and ``loss.png``: train vs validation per epoch, phase changes dashed."""
    from covidscan.plotting import new_figure, save_figure

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    epochs = [row["epoch"] for row in rows]
    phase_starts = [row["epoch"] - 0.5 for prev, row in itertools.pairwise(rows) if row["phase"] != prev["phase"]]
    written = []
    for metric, label in (("accuracy", "Accuracy"), ("loss", "Loss")):
        fig = new_figure(figsize=(6, 4), layout="tight")
        ax = fig.subplots()
        ax.plot(epochs, [row[metric] for row in rows], marker="o", label="train")
        val = [row.get(f"val_{metric}", math.nan) for row in rows]
        if any(not math.isnan(v) for v in val):
            ax.plot(epochs, val, marker="o", label="validation")
        for x in phase_starts:
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save_figure(fig, plot_dir / f"{metric}.png", dpi=100))
    return written
