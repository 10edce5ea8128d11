"""Figures for evaluation reports (matplotlib figures on an Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, precision_recall_curve, roc_curve

from covidscan.evaluation.calibration import ReliabilityTable
from covidscan.evaluation.metrics import PredictionSet, normalise_confusion
from covidscan.plotting import new_figure, save_figure


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def plot_confusion(counts: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Counts and row-normalised rates side by side (rows = true class)."""
    size = max(4.0, 1.2 * len(class_names) + 2)
    fig = new_figure(figsize=(2 * size, size))
    axes = fig.subplots(1, 2)
    ConfusionMatrixDisplay(counts, display_labels=class_names).plot(
        ax=axes[0], colorbar=False, cmap="Blues", values_format="d"
    )
    ConfusionMatrixDisplay(normalise_confusion(counts), display_labels=class_names).plot(
        ax=axes[1], colorbar=False, cmap="Blues", values_format=".2f"
    )
    axes[0].set_title("counts")
    axes[1].set_title("normalised by true class")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(title)
    return _save(fig, path)


def plot_roc_pr(predictions: PredictionSet, positive: int, path: Path, title: str = "") -> Path:
    """ROC and precision-recall curves: the positive class for binary models, every class one-vs-rest
    otherwise (classes absent from the set are skipped)."""
    fig = new_figure(figsize=(11, 5))
    roc_ax, pr_ax = fig.subplots(1, 2)
    classes = range(predictions.num_classes) if predictions.num_classes > 2 else [positive]
    for c in classes:
        is_c = predictions.y_true == c
        if is_c.all() or not is_c.any():
            continue
        name = predictions.class_names[c]
        fpr, tpr, _ = roc_curve(is_c, predictions.proba[:, c])
        precision, recall, _ = precision_recall_curve(is_c, predictions.proba[:, c])
        roc_ax.plot(fpr, tpr, label=f"{name} vs rest")
        pr_ax.step(recall, precision, where="post", label=f"{name} vs rest (prevalence {is_c.mean():.2f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    roc_ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title="ROC",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    pr_ax.set(
        xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01)
    )
    for ax, corner in ((roc_ax, "lower right"), (pr_ax, "lower left")):
        if ax.get_legend_handles_labels()[0]:  # nothing to label when one class is absent
            ax.legend(loc=corner, fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_reliability(table: ReliabilityTable, path: Path, title: str = "") -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with bin counts."""
    fig = new_figure(figsize=(5.5, 6.5))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centers = (table.edges[:-1] + table.edges[1:]) / 2
    width = table.edges[1] - table.edges[0]
    filled = table.count > 0
    ax.bar(
        centers[filled],
        table.accuracy[filled],
        width=width * 0.95,
        color="tab:blue",
        alpha=0.7,
        label="accuracy in bin",
    )
    ax.plot(
        table.confidence[filled],
        table.accuracy[filled],
        "o",
        color="tab:orange",
        markersize=4,
        label="(mean confidence, accuracy)",
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    ax.set(ylabel="accuracy", title=f"Reliability (ECE = {table.ece:.3f})", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centers, table.count, width=width * 0.95, color="grey")
    hist.set(xlabel="top-class confidence", ylabel="items")
    fig.suptitle(title)
    return _save(fig, path)


def plot_prediction_grid(
    images: Sequence[np.ndarray],
    true_labels: Sequence[str],
    predicted: Sequence[str],
    path: Path,
    confidences: Sequence[float] | None = None,
    columns: int = 4,
) -> Path:
    """Images titled 'pred X / true Y', green when right and red when wrong (study D)."""
    if not images:
        raise ValueError("prediction grid needs at least one image")
    rows = int(np.ceil(len(images) / columns))
    fig = new_figure(figsize=(3 * columns, 3.2 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (image, true, pred) in enumerate(zip(images, true_labels, predicted)):
        ax = axes.ravel()[i]
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        confidence = f" ({confidences[i]:.2f})" if confidences is not None else ""
        ax.set_title(f"pred {pred}{confidence}\ntrue {true}", color="green" if pred == true else "red", fontsize=9)
    return _save(fig, path)


def plot_roc_overlay(sets: dict[str, PredictionSet], positive: int, path: Path, title: str = "") -> Path:
    """The positive class's ROC curve of every evaluated set on one plot (in-source and external
    alike), each labelled with its AUC; sets with one class have no curve and say so."""
    from sklearn.metrics import roc_auc_score

    fig = new_figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    for name, predictions in sets.items():
        is_positive = predictions.y_true == positive
        if is_positive.all() or not is_positive.any():
            ax.plot([], [], linestyle="none", label=f"{name}: one class, no curve")
            continue
        fpr, tpr, _ = roc_curve(is_positive, predictions.proba[:, positive])
        auc = roc_auc_score(is_positive, predictions.proba[:, positive])
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} (AUC {auc:.3f}, n={len(predictions)})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=f"ROC by set {title}")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_source_matrix(
    values: np.ndarray,
    ci_low: np.ndarray,
    ci_high: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    held_out_columns: Sequence[int],
    path: Path,
    title: str = "",
) -> Path:
    """Heat-map of a train-sources x test-source matrix (e.g. ROC AUC), each cell annotated with its
    value and 95% CI; the held-out (out-of-source) cell of each row is outlined. Colours run from
    chance (0.5, red) to perfect (1.0, green); a cell without a value is grey."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    rows, columns = values.shape
    fig = new_figure(figsize=(2.2 * columns + 3.5, 1.1 * rows + 1.8), layout="tight")
    ax = fig.add_subplot()
    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.5, vmax=1.0, aspect="auto")
    for i in range(rows):
        for j in range(columns):
            if np.isnan(values[i, j]):
                text = "n/a"
            elif np.isnan(ci_low[i, j]) or np.isnan(ci_high[i, j]):
                text = f"{values[i, j]:.3f}"
            else:
                text = f"{values[i, j]:.3f}\n[{ci_low[i, j]:.2f}, {ci_high[i, j]:.2f}]"
            ax.text(j, i, text, ha="center", va="center", fontsize=9)
        column = held_out_columns[i]  # inset, so neighbouring cells never look outlined too
        ax.add_patch(Rectangle((column - 0.45, i - 0.45), 0.9, 0.9, fill=False, linewidth=3, edgecolor="navy", ls="--"))
    ax.set_xticks(range(columns), [f"test: {name}" for name in column_labels], rotation=20, ha="right")
    ax.set_yticks(range(rows), list(row_labels))
    ax.set_title(f"{title}\n(dashed outline: the held-out source, never seen in training)", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="ROC AUC (0.5 = chance)")
    return _save(fig, path)
