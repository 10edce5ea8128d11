"""Calibration: does a predicted probability of 0.9 mean right 9 times out of 10?

Expected calibration error (ECE) over equal-width bins of the top-class confidence (Guo et al.,
2017), the reliability-diagram table behind it, and temperature scaling fitted on the validation
split by minimising the negative log-likelihood with L-BFGS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from covidscan.data.records import DataError
from covidscan.errors import UsageError


@dataclass
class ReliabilityTable:
    """Per equal-width confidence bin: mean confidence, accuracy and item count (empty bins: NaN)."""

    edges: np.ndarray  # (B + 1,)
    confidence: np.ndarray  # (B,)
    accuracy: np.ndarray  # (B,)
    count: np.ndarray  # (B,)

    @property
    def ece(self) -> float:
        """Count-weighted mean |accuracy - confidence| over non-empty bins."""
        filled = self.count > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(gaps * self.count[filled]) / self.count.sum())

    def to_dict(self) -> dict[str, list[float | None] | float]:
        def clean(values: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else float(v) for v in values]

        return {
            "ece": self.ece,
            "edges": self.edges.tolist(),
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
            "count": self.count.astype(int).tolist(),
        }


def reliability_table(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> ReliabilityTable:
    """Bin items by their top-class probability; a bin's accuracy is how often that class was right."""
    if n_bins < 1:
        raise UsageError(f"n_bins must be >= 1, got {n_bins}")
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins (lo, hi], the first also taking 0: the convention of Guo et al.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=n_bins) / count
    return ReliabilityTable(edges, mean_conf, accuracy, count)


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    return reliability_table(proba, y_true, n_bins).ece


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): identical to dividing the logits by T, as softmax ignores constant shifts."""
    scaled = np.log(np.clip(proba, 1e-12, 1.0)) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(proba: np.ndarray, y_true: np.ndarray, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising validation NLL (fitted as log T, so T stays positive)."""
    if len(y_true) == 0:
        raise DataError("temperature scaling needs a non-empty validation split")
    log_p = torch.log(torch.as_tensor(proba, dtype=torch.float64).clamp(min=1e-12))
    target = torch.as_tensor(y_true, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_p / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())
