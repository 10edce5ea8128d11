"""Decision thresholds chosen on the validation split and then applied, unchanged, to test.

Choosing the threshold on the test set itself would make the reported sensitivity optimistic;
the threshold is a property of the model fixed before the test data is looked at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from sklearn.metrics import roc_curve

from covidscan.data.records import DataError
from covidscan.errors import UsageError

ThresholdMethod = Literal["youden", "sensitivity"]


@dataclass
class OperatingPoint:
    """A threshold on the positive-class probability and how it behaved where it was chosen."""

    method: ThresholdMethod
    threshold: float
    target_sensitivity: float | None
    chosen_on: str  # e.g. "val (120 items)"
    sensitivity_at_choice: float
    specificity_at_choice: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def choose_threshold(
    is_positive: np.ndarray,
    scores: np.ndarray,
    *,
    method: ThresholdMethod = "youden",
    target_sensitivity: float = 0.95,
    chosen_on: str = "val",
) -> OperatingPoint:
    """Youden's J (max sensitivity + specificity - 1) or the highest threshold reaching a target
    sensitivity (so specificity is as high as that sensitivity allows)."""
    if method not in ("youden", "sensitivity"):
        raise UsageError(f"threshold method must be 'youden' or 'sensitivity', got {method!r}")
    if not 0 < target_sensitivity <= 1:
        raise UsageError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        raise DataError(f"cannot choose a threshold on {chosen_on}: it holds only one class")
    fpr, tpr, thresholds = roc_curve(is_positive, scores, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # scikit-learn's first threshold is +inf
    index = int(np.argmax(tpr - fpr)) if method == "youden" else int(np.argmax(tpr >= target_sensitivity))
    return OperatingPoint(
        method,
        float(thresholds[index]),
        target_sensitivity if method == "sensitivity" else None,
        chosen_on,
        float(tpr[index]),
        float(1 - fpr[index]),
    )
