"""Typed results of an evaluation and of a comparison, read by attribute; ``to_dict()`` is their JSON.

``EvaluationReport.to_dict()`` is what ``metrics.json`` holds and ``Comparison.to_dict()`` what
``comparison.json`` holds; both keep the layout those files had when they were built as dicts, so
readers of old and new files see the same keys (sections that do not apply are left out, as before).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from covidscan.evaluation.metrics import MetricValue
from covidscan.evaluation.operating_point import OperatingPoint
from covidscan.evaluation.stats import TestResult

Metrics = dict[str, MetricValue]
# what a set of a multi-set evaluation is to the model: its own split (the reference), a set marked as
# never seen, or a set merely given (--data, not marked external: it may or may not share the training source)
SetKind = Literal["in-source", "external", "given (--data)"]


def metrics_to_dict(metrics: Metrics) -> dict[str, dict[str, Any]]:
    """``{name: {value, ci_low, ci_high, undefined}}``, the JSON form of a metrics table."""
    return {name: metric.to_dict() for name, metric in metrics.items()}


@dataclass
class BootstrapInfo:
    """How the CIs were made: resamples, level, method, resampling unit (patient or item) and seed."""

    n_resamples: int
    confidence: float
    method: str
    unit: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConfusionMatrix:
    counts: list[list[int]]  # rows = true class, columns = predicted class
    normalised: list[list[float]]  # each row sums to 1 (an absent class stays all zero)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CalibrationSummary:
    """ECE (before and after optional temperature scaling) and the reliability table."""

    ece_before_scaling: float
    ece: float
    reliability: dict[str, Any]
    bins: str
    temperature: float | None = None  # set when temperature scaling was fitted on val

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"ece_before_scaling": self.ece_before_scaling}
        if self.temperature is not None:
            result["temperature"] = self.temperature
        result.update(ece=self.ece, reliability=self.reliability, bins=self.bins)
        return result


@dataclass
class ThresholdMetrics:
    """The val-chosen operating point and the metrics (with CIs) it gives on the evaluated set."""

    point: OperatingPoint
    metrics: Metrics
    confusion_matrix: ConfusionMatrix

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.point.to_dict(),
            "metrics": metrics_to_dict(self.metrics),
            "confusion_matrix": self.confusion_matrix.to_dict(),
        }


@dataclass
class PatientLevel:
    """Metrics after aggregating each patient's items (``aggregation``: mean or max)."""

    aggregation: str
    n_patients: int
    metrics: Metrics
    bootstrap: BootstrapInfo
    confusion_matrix: ConfusionMatrix

    def to_dict(self) -> dict[str, Any]:
        return {
            "aggregation": self.aggregation,
            "n_patients": self.n_patients,
            "metrics": metrics_to_dict(self.metrics),
            "bootstrap": self.bootstrap.to_dict(),
            "confusion_matrix": self.confusion_matrix.to_dict(),
        }


@dataclass
class SourceMetrics:
    """One source's share of an evaluated set (``Sample.source``): its own metrics and CIs, and the
    metrics at the set's val-chosen threshold when there is one."""

    n_items: int
    n_patients: int | None
    class_counts: dict[str, int]
    metrics: Metrics
    bootstrap: BootstrapInfo
    at_threshold: Metrics | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_items": self.n_items,
            "n_patients": self.n_patients,
            "class_counts": self.class_counts,
            "metrics": metrics_to_dict(self.metrics),
            "bootstrap": self.bootstrap.to_dict(),
            "metrics_at_threshold": metrics_to_dict(self.at_threshold) if self.at_threshold is not None else None,
        }


@dataclass
class EvaluationReport:
    """Everything one evaluation measured (``metrics.json``); see docs/evaluation.md for each field."""

    run: str | None  # None for an ONNX export evaluated without its run directory
    checkpoint: str
    model: str
    model_id: str  # provenance (``Predictor.describe()``): which model, which weights, which engine
    model_version: str
    checkpoint_sha256: str
    engine: str  # "pytorch", "onnxruntime" (an ensemble: its members' engines)
    tta: list[str]  # test-time augmentation views; ["identity"] without TTA
    dataset: str
    split: str
    external: bool
    label_map: dict[str, str]
    class_names: list[str]
    positive_class: str
    n_items: int
    n_patients: int | None
    class_counts: dict[str, int]
    metrics: Metrics
    bootstrap: BootstrapInfo
    confusion_matrix: ConfusionMatrix
    per_class: dict[str, dict[str, float]]
    calibration: CalibrationSummary
    warnings: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable, left out
    operating_point: ThresholdMetrics | None = None
    operating_point_skipped: str | None = None  # why no threshold was chosen
    patient_level: PatientLevel | None = None  # only when some patient has several items
    per_source: dict[str, SourceMetrics] = field(default_factory=dict)  # only with two or more sources
    # Grad-CAM mass outside the lungs (covidscan.explain.lung_check), only when asked for (cam_lung=N)
    cam_lung: dict[str, Any] | None = None
    figures: dict[str, str] | None = None  # figure file names, once written

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "run": self.run,
            "checkpoint": self.checkpoint,
            "model": self.model,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "checkpoint_sha256": self.checkpoint_sha256,
            "engine": self.engine,
            "tta": self.tta,
            "dataset": self.dataset,
            "split": self.split,
            "external": self.external,
            "label_map": self.label_map,
            "class_names": self.class_names,
            "positive_class": self.positive_class,
            "n_items": self.n_items,
            "n_patients": self.n_patients,
            "class_counts": self.class_counts,
            "metrics": metrics_to_dict(self.metrics),
            "bootstrap": self.bootstrap.to_dict(),
            "confusion_matrix": self.confusion_matrix.to_dict(),
            "per_class": self.per_class,
            "calibration": self.calibration.to_dict(),
            "warnings": self.warnings,
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "operating_point": (
                self.operating_point.to_dict()
                if self.operating_point is not None
                else {"skipped": self.operating_point_skipped}
            ),
        }
        if self.patient_level is not None:
            result["patient_level"] = self.patient_level.to_dict()
        if self.per_source:
            result["per_source"] = {name: part.to_dict() for name, part in self.per_source.items()}
        if self.cam_lung is not None:
            result["cam_lung"] = self.cam_lung
        if self.figures is not None:
            result["figures"] = self.figures
        return result


@dataclass
class ComparisonRow:
    """One model of a comparison: who it is, what it cost, its metrics (with CIs) and its rank."""

    run: str
    run_dir: str
    model: str
    parameters: int
    runtime_seconds: float | None
    metrics: Metrics
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "run_dir": self.run_dir,
            "model": self.model,
            "parameters": self.parameters,
            "runtime_seconds": self.runtime_seconds,
            "metrics": metrics_to_dict(self.metrics),
            "rank": self.rank,
        }


@dataclass
class PairComparison:
    """Two models on the same items: significance tests and metric differences A - B (paired CIs)."""

    a: str
    b: str
    tests: list[TestResult]
    differences: Metrics

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "tests": [test.to_dict() for test in self.tests],
            "differences": metrics_to_dict(self.differences),
        }


@dataclass
class Comparison:
    """A ranked table of models with pairwise tests (``comparison.json``); ``out_dir`` holds its files."""

    dataset: str
    split: str
    external: bool
    level: str
    aggregation: str | None
    n_compared: int
    positive_class: str
    ranked_by: str
    metrics: list[str]
    bootstrap: BootstrapInfo
    rows: list[ComparisonRow]
    pairs: list[PairComparison]
    grids: dict[str, str]
    notes: list[str] = field(default_factory=list)  # e.g. which split was used and why
    out_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        result = {
            "dataset": self.dataset,
            "split": self.split,
            "external": self.external,
            "level": self.level,
            "aggregation": self.aggregation,
            "n_compared": self.n_compared,
            "positive_class": self.positive_class,
            "ranked_by": self.ranked_by,
            "metrics": self.metrics,
            "bootstrap": self.bootstrap.to_dict(),
            "rows": [row.to_dict() for row in self.rows],
            "pairs": [pair.to_dict() for pair in self.pairs],
            "grids": self.grids,
        }
        if self.notes:
            result["notes"] = self.notes
        return result


@dataclass
class TransferRow:
    """One evaluated set in a multi-set report: its AUC (CI), sensitivity/specificity at the threshold
    chosen on the run's own val split (``threshold`` None: arg-max), the AUC drop from in-source,
    the verdict and, when asked for, where the model looks (so a shortcut shows beside the AUC)."""

    name: str
    dataset: str
    split: str
    external: bool
    kind: SetKind  # "in-source" only for the run's own split, the reference the others are compared with
    n_items: int
    n_patients: int | None
    roc_auc: MetricValue
    sensitivity: MetricValue
    specificity: MetricValue
    threshold: float | None
    auc_drop: float | None  # in-source AUC minus this set's; None for the reference or when undefined
    verdict: str
    cam_lung: dict[str, Any] | None = None  # the set's own Grad-CAM lung check (cam_lung=N), when measured

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        for name in ("roc_auc", "sensitivity", "specificity"):
            result[name] = getattr(self, name).to_dict()
        return result


@dataclass
class TransferReport:
    """In-source vs external sets for one run (``summary.json``); every set's own files are in its folder."""

    run: str
    model: str
    positive_class: str
    reference: str | None  # the in-source set's name; None when the run has none
    rows: list[TransferRow]
    notes: list[str] = field(default_factory=list)
    out_dir: Path | None = None

    def row(self, name: str) -> TransferRow:
        return next(row for row in self.rows if row.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "model": self.model,
            "positive_class": self.positive_class,
            "reference": self.reference,
            "rows": [row.to_dict() for row in self.rows],
            "notes": self.notes,
        }
