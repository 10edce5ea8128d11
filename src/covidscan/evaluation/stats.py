"""Tests between two models evaluated on the same items.

- Fisher's exact test (two-sided, SciPy), as in study C: the 2x2 table is
  ``[[correct_A, wrong_A], [correct_B, wrong_B]]``. It treats the two models' results as
  independent samples, which ignores the pairing; it is kept because the study reports it.
- McNemar's test uses the pairing: only items where exactly one model is right count.
  ``b`` = A right and B wrong, ``c`` = A wrong and B right; exact binomial test when ``b + c < 25``,
  otherwise chi-square with continuity correction (statsmodels' ``mcnemar`` conventions).
- DeLong's test for two correlated ROC AUCs on the same items (DeLong et al., 1988), with the fast
  O(N log N) structural-component algorithm of Sun & Xu (2014).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

EXACT_MCNEMAR_BELOW = 25


def significance_stars(p_value: float | None) -> str:
    """``***`` p < 0.001, ``**`` p < 0.01, ``*`` p < 0.05, else empty."""
    if p_value is None or np.isnan(p_value):
        return ""
    return "***" if p_value < 0.001 else "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""


@dataclass
class TestResult:
    test: str
    statistic: float | None
    p_value: float | None  # None when the test is undefined for these items (see detail)
    detail: str  # what was compared, e.g. the 2x2 table or the two AUCs

    @property
    def stars(self) -> str:
        return significance_stars(self.p_value)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "stars": self.stars}


def _as_bool(correct: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(correct)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-item correctness")
    return array.astype(bool)


def fisher_exact_test(correct_a: np.ndarray, correct_b: np.ndarray) -> TestResult:
    """Two-sided Fisher's exact test on ``[[correct_A, wrong_A], [correct_B, wrong_B]]``."""
    a, b = _as_bool(correct_a, "correct_a"), _as_bool(correct_b, "correct_b")
    table = [[int(a.sum()), int((~a).sum())], [int(b.sum()), int((~b).sum())]]
    odds_ratio, p_value = stats.fisher_exact(table, alternative="two-sided")
    return TestResult(
        "Fisher exact", float(odds_ratio), float(p_value), f"[[correct A, wrong A], [correct B, wrong B]] = {table}"
    )


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> TestResult:
    """McNemar's test on the discordant pairs of two models scored on the same items."""
    a, b = _as_bool(correct_a, "correct_a"), _as_bool(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs the same items for both models ({a.size} vs {b.size})")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    detail = f"A right/B wrong = {only_a}, A wrong/B right = {only_b}"
    if discordant == 0:
        return TestResult("McNemar", None, 1.0, detail + " (no discordant items)")
    if discordant < EXACT_MCNEMAR_BELOW:
        p_value = stats.binomtest(min(only_a, only_b), discordant, 0.5).pvalue
        return TestResult("McNemar (exact binomial)", float(min(only_a, only_b)), float(min(p_value, 1.0)), detail)
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    return TestResult(
        "McNemar (chi2, continuity-corrected)", float(statistic), float(stats.chi2.sf(statistic, df=1)), detail
    )


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank, per row (Sun & Xu's 'compute_midrank')."""
    return stats.rankdata(values, axis=-1)


@dataclass
class DeLongResult(TestResult):
    auc_a: float = float("nan")
    auc_b: float = float("nan")


def delong_test(is_positive: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """Two-sided DeLong test that two correlated ROC AUCs on the same items are equal."""
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.vstack([scores_a, scores_b]).astype(np.float64)
    if scores.shape[1] != is_positive.size:
        raise ValueError("DeLong needs one score per item for both models")
    m, n = int(is_positive.sum()), int((~is_positive).sum())
    if m < 2 or n < 2:
        raise ValueError(
            f"DeLong's test needs at least two positive and two negative items (got {m} and {n}): "
            "the AUC variance is undefined otherwise"
        )
    positives, negatives = scores[:, is_positive], scores[:, ~is_positive]
    rank_pos, rank_neg, rank_all = (
        _midranks(positives),
        _midranks(negatives),
        _midranks(np.hstack([positives, negatives])),
    )
    aucs = (rank_all[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v01 = (rank_all[:, :m] - rank_pos) / n  # structural components of the positives
    v10 = 1 - (rank_all[:, m:] - rank_neg) / m  # ... and of the negatives
    covariance = np.cov(v01) / m + np.cov(v10) / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = aucs[0] - aucs[1]
    detail = f"AUC A = {aucs[0]:.4f}, AUC B = {aucs[1]:.4f}"
    if variance <= 0:  # identical score rankings: no evidence of a difference
        return DeLongResult("DeLong", 0.0, 1.0, detail, float(aucs[0]), float(aucs[1]))
    z = difference / np.sqrt(variance)
    return DeLongResult("DeLong", float(z), float(2 * stats.norm.sf(abs(z))), detail, float(aucs[0]), float(aucs[1]))


def compare_predictions(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    positive: int,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
) -> list[TestResult]:
    """McNemar, Fisher and DeLong for one pair of models (DeLong undefined with < 2 items of a class)."""
    correct_a, correct_b = pred_a == y_true, pred_b == y_true
    results: list[TestResult] = [mcnemar_test(correct_a, correct_b), fisher_exact_test(correct_a, correct_b)]
    is_positive = y_true == positive
    positives, negatives = int(is_positive.sum()), int((~is_positive).sum())
    if min(positives, negatives) >= 2:
        results.append(delong_test(is_positive, scores_a, scores_b))
    else:
        results.append(
            TestResult(
                "DeLong",
                None,
                None,
                f"undefined: needs at least two positive and two negative items, got {positives} and {negatives}",
            )
        )
    return results
