"""Point estimates of classification metrics, built on scikit-learn.

Binary metrics (sensitivity, specificity, precision, F1, ROC AUC, PR AUC) are always computed for
the *positive class versus the rest*, so a 3-class model (study C: NCP / CP / normal) reports COVID
vs rest exactly as a 2-class one does. A metric that cannot be computed on the data at hand (AUC
with one class present, precision with nothing predicted positive) is an explicit *undefined* cell
with a reason, never a crash or a silent 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from covidscan.data.records import DataError
from covidscan.errors import UsageError

logger = logging.getLogger(__name__)

# Names datasets use for the COVID class: COVID, Covid, CT_COVID, COVID-19, covid19, NCP, SARS-CoV-2.
_COVID_NAME = re.compile(r"(ct[_ -]?)?(covid([_ -]?19)?|ncp|sars[_ -]?cov[_ -]?2)", re.IGNORECASE)

BINARY_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc")
MULTICLASS_METRICS = ("macro_f1", "macro_auroc")
METRIC_LABELS = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "macro_f1": "Macro F1",
    "macro_auroc": "Macro AUROC (one-vs-rest)",
}


def metric_names(num_classes: int) -> tuple[str, ...]:
    """The scalar metrics reported for a ``num_classes``-way model, in report order."""
    return BINARY_METRICS + (MULTICLASS_METRICS if num_classes > 2 else ())


def resolve_positive_class(class_names: Sequence[str], preferred: str | None = None) -> int:
    """Index of the positive class: ``preferred`` if given, else the one class named like COVID.

    Falls back (with a warning) to class 1 for binary models and class 0 otherwise, matching
    scikit-learn's ``pos_label=1`` convention.
    """
    names = list(class_names)
    if preferred is not None:
        if preferred not in names:
            raise UsageError(
                f"positive class {preferred!r} is not one of the model's classes {names}; "
                "pass --positive-class with one of them"
            )
        return names.index(preferred)
    matches = [i for i, name in enumerate(names) if _COVID_NAME.fullmatch(name.strip())]
    if len(matches) == 1:
        return matches[0]
    fallback = 1 if len(names) == 2 else 0
    logger.warning(
        "no single COVID-like class among %s; using %r as the positive class (set "
        "data.positive_class or pass --positive-class)",
        names,
        names[fallback],
    )
    return fallback


@dataclass
class PredictionSet:
    """Per-item truth and class probabilities of one evaluated set, with what each item was."""

    y_true: np.ndarray  # (N,) class indices
    proba: np.ndarray  # (N, K) probabilities, rows sum to 1
    class_names: list[str]
    paths: list[str] = field(default_factory=list)
    patient_ids: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.y_true = np.asarray(self.y_true, dtype=np.int64)
        self.proba = np.asarray(self.proba, dtype=np.float64)
        n, k = len(self.y_true), len(self.class_names)
        if n == 0:
            raise DataError(
                "the evaluation set is empty: no items to evaluate; check --data and --split "
                "(the split may hold no samples)"
            )
        if self.proba.shape != (n, k):
            raise ValueError(
                f"probabilities have shape {self.proba.shape}, expected ({n}, {k}) for "
                f"{n} items and classes {self.class_names}"
            )
        bad = ~np.isfinite(self.proba).all(axis=1)
        if bad.any():
            first = self.paths[int(np.argmax(bad))] if self.paths else f"item {int(np.argmax(bad))}"
            raise DataError(
                f"the model produced NaN/inf probabilities for {int(bad.sum())} item(s) (first: "
                f"{first}); the checkpoint's weights are probably corrupt or training diverged"
            )
        if self.y_true.min() < 0 or self.y_true.max() >= k:
            raise ValueError(f"true labels must be class indices in [0, {k}); unlabeled items cannot be evaluated")
        self.paths = list(self.paths) or [f"item-{i}" for i in range(n)]
        self.patient_ids = list(self.patient_ids) or [None] * n
        if not (len(self.paths) == len(self.patient_ids) == n):
            raise ValueError("paths and patient_ids must have one entry per item")

    def __len__(self) -> int:
        return len(self.y_true)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def groups(self) -> np.ndarray:
        """Patient id per item; an item without one is its own patient (keyed by its path)."""
        return np.array([p if p else f"path:{path}" for p, path in zip(self.patient_ids, self.paths)])

    def has_patients(self) -> bool:
        return any(self.patient_ids)


def predict_labels(proba: np.ndarray, positive: int, threshold: float | None = None) -> np.ndarray:
    """Arg-max labels; with ``threshold``, an item is positive iff its positive-class probability
    reaches it, otherwise it gets the most probable of the other classes."""
    labels = proba.argmax(axis=1)
    if threshold is None:
        return labels
    others = proba.copy()
    others[:, positive] = -np.inf
    return np.where(proba[:, positive] >= threshold, positive, others.argmax(axis=1))


@dataclass
class MetricValue:
    """One metric: a value, or ``None`` with the reason it is undefined; CI filled by the bootstrap."""

    value: float | None
    undefined: str | None = None
    ci_low: float | None = None
    ci_high: float | None = None

    def to_dict(self) -> dict[str, float | str | None]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "undefined": self.undefined}


def _ratio(numerator: float, denominator: float, reason: str) -> MetricValue:
    return MetricValue(numerator / denominator) if denominator > 0 else MetricValue(None, reason)


def compute_metrics(
    predictions: PredictionSet, positive: int, threshold: float | None = None
) -> dict[str, MetricValue]:
    """All scalar metrics of :func:`metric_names` for one prediction set (positive class vs rest)."""
    y, proba, k = predictions.y_true, predictions.proba, predictions.num_classes
    pred = predict_labels(proba, positive, threshold)
    is_pos, pred_pos = y == positive, pred == positive
    tp, fp = int(np.sum(is_pos & pred_pos)), int(np.sum(~is_pos & pred_pos))
    fn, tn = int(np.sum(is_pos & ~pred_pos)), int(np.sum(~is_pos & ~pred_pos))
    name = predictions.class_names[positive]
    results = {
        "accuracy": MetricValue(float(accuracy_score(y, pred))),
        "sensitivity": _ratio(tp, tp + fn, f"no '{name}' items in the set"),
        "specificity": _ratio(tn, tn + fp, f"no non-'{name}' items in the set"),
        "precision": _ratio(tp, tp + fp, f"no item predicted '{name}'"),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, f"no '{name}' items and none predicted"),
    }
    one_class = f"only one class present (all items {'are' if is_pos.all() else 'are not'} '{name}'): AUC undefined"
    if is_pos.all() or not is_pos.any():
        results["roc_auc"] = MetricValue(None, one_class)
        results["pr_auc"] = MetricValue(None, one_class)
    else:
        results["roc_auc"] = MetricValue(float(roc_auc_score(is_pos, proba[:, positive])))
        results["pr_auc"] = MetricValue(float(average_precision_score(is_pos, proba[:, positive])))
    if k > 2:
        results["macro_f1"] = MetricValue(float(f1_score(y, pred, labels=range(k), average="macro", zero_division=0)))
        absent = [predictions.class_names[c] for c in range(k) if not np.any(y == c)]
        results["macro_auroc"] = (
            MetricValue(None, f"class(es) {absent} absent: one-vs-rest AUC undefined for them")
            if absent
            else MetricValue(float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=range(k))))
        )
    return results


def confusion_counts(predictions: PredictionSet, positive: int, threshold: float | None = None) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    pred = predict_labels(predictions.proba, positive, threshold)
    return confusion_matrix(predictions.y_true, pred, labels=range(predictions.num_classes))


def normalise_confusion(counts: np.ndarray) -> np.ndarray:
    """Row-normalised confusion (each true class sums to 1; an absent class stays all-zero)."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)


def per_class_report(
    predictions: PredictionSet, positive: int, threshold: float | None = None
) -> dict[str, dict[str, float]]:
    """scikit-learn's per-class precision / recall / F1 / support, keyed by class name."""
    pred = predict_labels(predictions.proba, positive, threshold)
    report = classification_report(
        predictions.y_true,
        pred,
        labels=range(predictions.num_classes),
        target_names=predictions.class_names,
        output_dict=True,
        zero_division=0,
    )
    return {name: {key: float(v) for key, v in report[name].items()} for name in predictions.class_names}
