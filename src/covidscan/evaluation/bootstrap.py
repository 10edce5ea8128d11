"""Vectorised nonparametric bootstrap confidence intervals for every metric.

A resample is represented by how many times it draws each item (a row of a count matrix), so one
matrix product gives every resample's confusion counts at once, and a rank-based AUC / average
precision works on the score order computed once for all resamples. The patient-level bootstrap
draws patients instead of items (all items of a drawn patient come along), which is the right
resampling unit when slices of one patient are correlated.

Percentile intervals: the (alpha/2, 1 - alpha/2) quantiles of the resampled metric, over the
resamples in which the metric is defined (e.g. AUC needs both classes in the resample).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from covidscan.errors import UsageError
from covidscan.evaluation.metrics import MetricValue, PredictionSet, predict_labels

_CHUNK_CELLS = 1_000_000  # resamples x items per chunk: small enough to stay in CPU cache


def _chunk_sizes(n_items: int, n_resamples: int) -> list[int]:
    """Resamples per chunk, so that a chunk's (resamples, items) weight matrix stays cache-sized."""
    chunk = max(1, _CHUNK_CELLS // max(n_items, 1))
    return [min(chunk, n_resamples - start) for start in range(0, n_resamples, chunk)]


def _resample_counts(n_units: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, n_units) float32 matrix: how often each unit is drawn in each resample."""
    draws = rng.integers(0, n_units, size=(rows, n_units))
    draws += np.arange(rows)[:, None] * n_units
    return np.bincount(draws.ravel(), minlength=rows * n_units).reshape(rows, n_units).astype(np.float32)


def default_workers() -> int:
    """Threads for the bootstrap: NumPy releases the GIL in the heavy loops, so each core helps."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _cumsum(values: np.ndarray) -> np.ndarray:
    """Row-wise cumulative sums (exact: weights are integer counts). torch's 1-D scan is about twice
    as fast as NumPy's; row by row it stays on the calling thread, where a 2-D ``torch.cumsum``
    would spread a few rows over torch's thread pool and lose more to the hand-offs than it gains."""
    source = torch.from_numpy(values)
    out = torch.empty_like(source)
    for row in range(len(source)):
        torch.cumsum(source[row], dim=0, out=out[row])
    return out.numpy()


class _RankedScores:
    """Items sorted by descending score, for weighted ROC AUC and average precision in O(N) per row.

    Within a group of tied scores, negatives are placed before positives, so an item-level cumulative
    sum counts every tied negative as "above" a positive; the exact tie terms (half a win per tied
    pair for AUC, one shared threshold per distinct score for AP, as scikit-learn uses) are then
    corrected on the few tied items only. Weights given to :meth:`auc_and_ap` list items in ``order``.
    """

    def __init__(self, scores: np.ndarray, is_pos: np.ndarray) -> None:
        self.order = np.lexsort((is_pos, -scores))
        sorted_scores = scores[self.order]
        self.is_neg = (~is_pos[self.order]).astype(np.float32)
        new_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
        group = np.cumsum(new_group) - 1
        size = np.bincount(group)
        tied = np.flatnonzero(size[group] > 1)
        self.tied = tied if tied.size else None
        if self.tied is not None:
            tied_group = group[tied]
            self.tied_starts = np.flatnonzero(np.r_[True, tied_group[1:] != tied_group[:-1]])
            self.tied_last = tied[np.r_[self.tied_starts[1:], tied.size] - 1]

    def auc_and_ap(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ROC AUC, average precision) per resample row; NaN where one class has no weight."""
        neg = weights * self.is_neg
        pos = weights - neg
        cum_neg, cum_all = _cumsum(neg), _cumsum(weights)
        total_neg = cum_neg[:, -1].astype(np.float64)
        total_pos = cum_all[:, -1].astype(np.float64) - total_neg
        # Mann-Whitney U counted as losses: negatives scored at or above each positive.
        losses = (pos * cum_neg).sum(axis=1, dtype=np.float64)
        precision = (cum_all - cum_neg) / np.maximum(cum_all, 1)
        hits = (pos * precision).sum(axis=1, dtype=np.float64)
        if self.tied is not None:
            tied_pos = pos[:, self.tied]
            group_pos = np.add.reduceat(tied_pos, self.tied_starts, axis=1)
            group_neg = np.add.reduceat(neg[:, self.tied], self.tied_starts, axis=1)
            losses -= 0.5 * np.sum(group_pos * group_neg, axis=1, dtype=np.float64)
            hits -= np.sum(tied_pos * precision[:, self.tied], axis=1, dtype=np.float64)
            hits += np.sum(group_pos * precision[:, self.tied_last], axis=1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = 1 - losses / (total_pos * total_neg)
            ap = hits / total_pos
        undefined = (total_pos == 0) | (total_neg == 0)
        auc[undefined] = np.nan
        ap[undefined] = np.nan
        return auc, ap


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


class BatchMetrics:
    """Every metric of :func:`metric_names` for many weightings of one prediction set at once.

    Weight columns follow ``self.order`` (items sorted by positive-class score), not input order.
    """

    def __init__(self, predictions: PredictionSet, positive: int, threshold: float | None = None) -> None:
        y, proba = predictions.y_true, predictions.proba
        self.k, self.positive = predictions.num_classes, positive
        self.ranked = _RankedScores(proba[:, positive], y == positive)
        self.order = self.ranked.order
        y, proba = y[self.order], proba[self.order]
        pred = predict_labels(proba, positive, threshold)
        # One indicator column per confusion cell (true, predicted): weights @ cells = confusion counts.
        self.cells = np.zeros((len(y), self.k * self.k), dtype=np.float32)
        self.cells[np.arange(len(y)), y * self.k + pred] = 1.0
        self.per_class = [_RankedScores(proba[:, c], y == c) for c in range(self.k)] if self.k > 2 else []

    def __call__(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Metric arrays of shape (R,) for float32 weights of shape (R, N) in ``self.order``."""
        k, p = self.k, self.positive
        confusion = (weights @ self.cells).astype(np.float64).reshape(-1, k, k)
        total = confusion.sum(axis=(1, 2))
        tp = confusion[:, p, p]
        actual_pos, predicted_pos = confusion[:, p, :].sum(axis=1), confusion[:, :, p].sum(axis=1)
        fn, fp = actual_pos - tp, predicted_pos - tp
        tn = total - tp - fn - fp
        out = {
            "accuracy": _safe_divide(np.trace(confusion, axis1=1, axis2=2), total),
            "sensitivity": _safe_divide(tp, actual_pos),
            "specificity": _safe_divide(tn, tn + fp),
            "precision": _safe_divide(tp, predicted_pos),
            "f1": _safe_divide(2 * tp, 2 * tp + fp + fn),
        }
        out["roc_auc"], out["pr_auc"] = self.ranked.auc_and_ap(weights)
        if k > 2:
            diag = np.diagonal(confusion, axis1=1, axis2=2)
            denom = confusion.sum(axis=2) + confusion.sum(axis=1)
            class_f1 = np.where(denom > 0, 2 * diag / np.where(denom > 0, denom, 1), 0.0)  # zero_division=0
            out["macro_f1"] = class_f1.mean(axis=1)
            out["macro_auroc"] = np.mean(
                [ranked.auc_and_ap(weights[:, ranked.order])[0] for ranked in self.per_class], axis=0
            )
        return out


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise UsageError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be in (0, 1), got {confidence}")


def _resampled_metrics(
    batches: list[BatchMetrics], groups: np.ndarray | None, n_resamples: int, seed: int, workers: int | None
) -> list[dict[str, np.ndarray]]:
    """Every metric of every batch over the *same* resamples (paired when there are several models).

    Units are patients (``groups``) or items. Item units are numbered in the first batch's score
    order, so the common single-model case needs no gather. Chunks of resamples run on ``workers``
    threads, each chunk with its own seed spawned from ``seed``: results do not depend on ``workers``.
    """
    n_items = len(batches[0].order)
    if groups is None:
        unit_of_item = np.empty(n_items, dtype=np.int64)
        unit_of_item[batches[0].order] = np.arange(n_items)
    else:
        _, unit_of_item = np.unique(groups, return_inverse=True)
    n_units = int(unit_of_item.max()) + 1
    identity = np.arange(n_items)
    gathers: list[np.ndarray | None] = [
        None if np.array_equal(index, identity) else index for index in (unit_of_item[b.order] for b in batches)
    ]

    def resample_chunk(rows: int, seed_sequence: np.random.SeedSequence) -> list[dict[str, np.ndarray]]:
        counts = _resample_counts(n_units, rows, np.random.default_rng(seed_sequence))
        return [
            batch(counts if index is None else np.take(counts, index, axis=1)) for batch, index in zip(batches, gathers)
        ]

    sizes = _chunk_sizes(n_items, n_resamples)  # bounds the (rows, items) weight matrix
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        chunks = list(pool.map(resample_chunk, sizes, np.random.SeedSequence(seed).spawn(len(sizes))))
    return [
        {name: np.concatenate([chunk[i][name] for chunk in chunks]) for name in chunks[0][i]}
        for i in range(len(batches))
    ]


def _percentile_interval(values: np.ndarray, confidence: float) -> dict[str, float | int | None]:
    """The central ``confidence`` interval of the finite values (NaN = metric undefined in a resample)."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"ci_low": None, "ci_high": None, "n_defined": 0}
    alpha = (1 - confidence) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return {"ci_low": float(low), "ci_high": float(high), "n_defined": int(finite.size)}


def bootstrap_metrics(
    predictions: PredictionSet,
    positive: int,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    by_patient: bool | None = None,
    threshold: float | None = None,
    workers: int | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Percentile bootstrap CIs for every metric: ``{name: {ci_low, ci_high, n_defined}}``.

    ``by_patient`` resamples patients (default: whenever patient ids exist), so correlated slices of
    one patient are never treated as independent evidence.
    """
    _check(n_resamples, confidence)
    if by_patient is None:
        by_patient = predictions.has_patients()
    batch = BatchMetrics(predictions, positive, threshold)
    (samples,) = _resampled_metrics([batch], predictions.groups() if by_patient else None, n_resamples, seed, workers)
    return {name: _percentile_interval(values, confidence) for name, values in samples.items()}


def paired_bootstrap_difference(
    first: PredictionSet,
    second: PredictionSet,
    positive: int,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    by_patient: bool | None = None,
    workers: int | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """CI of ``metric(first) - metric(second)`` for every metric, both models scored on the same
    resamples of the same items (in the same order): how much better, and how sure."""
    _check(n_resamples, confidence)
    if first.paths != second.paths:
        raise ValueError("a paired difference needs both prediction sets on the same items in the same order")
    if by_patient is None:
        by_patient = first.has_patients()
    batches = [BatchMetrics(first, positive), BatchMetrics(second, positive)]
    samples_a, samples_b = _resampled_metrics(
        batches, first.groups() if by_patient else None, n_resamples, seed, workers
    )
    return {name: _percentile_interval(samples_a[name] - samples_b[name], confidence) for name in samples_a}


def attach_intervals(values: dict[str, MetricValue], intervals: dict[str, dict[str, float | int | None]]) -> None:
    """Fill the CI of each defined metric in place; an undefined metric keeps no interval."""
    for name, metric in values.items():
        if metric.value is not None and name in intervals:
            metric.ci_low, metric.ci_high = intervals[name]["ci_low"], intervals[name]["ci_high"]
