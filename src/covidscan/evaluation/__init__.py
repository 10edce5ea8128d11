"""Evaluation: metrics with bootstrap CIs, tests between models, calibration, operating points, reports."""

from covidscan.evaluation.aggregate import aggregate_by_patient
from covidscan.evaluation.bootstrap import bootstrap_metrics
from covidscan.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_table,
)
from covidscan.evaluation.evaluate import Evaluation, evaluate, evaluate_run, predict
from covidscan.evaluation.metrics import (
    PredictionSet,
    compute_metrics,
    confusion_counts,
    per_class_report,
    resolve_positive_class,
)
from covidscan.evaluation.operating_point import OperatingPoint, choose_threshold
from covidscan.evaluation.stats import delong_test, fisher_exact_test, mcnemar_test, significance_stars

__all__ = [
    "Evaluation",
    "OperatingPoint",
    "PredictionSet",
    "aggregate_by_patient",
    "apply_temperature",
    "bootstrap_metrics",
    "choose_threshold",
    "compute_metrics",
    "confusion_counts",
    "delong_test",
    "evaluate",
    "evaluate_run",
    "expected_calibration_error",
    "fisher_exact_test",
    "fit_temperature",
    "mcnemar_test",
    "per_class_report",
    "predict",
    "reliability_table",
    "resolve_positive_class",
    "significance_stars",
]
