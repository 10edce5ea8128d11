"""Evaluate a trained run on its own test split or on an external dataset, and write the report.

``evaluate_run`` is the one entry point the trainer, the CLI and ``compare`` share. It predicts
every item, computes point metrics (scikit-learn) with bootstrap CIs, picks an operating point on
the validation split, measures calibration, aggregates to patients when patient ids exist, splits
the metrics by source when the items come from several (``Sample.source``), and writes
``metrics.json``, ``predictions.csv``, figures and ``report.html`` / ``report.md``. The result is an
:class:`~covidscan.evaluation.results.EvaluationReport`; its ``to_dict()`` is ``metrics.json``.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from covidscan.data import load_samples
from covidscan.data.checks import verify_readable
from covidscan.data.records import DataError, Sample
from covidscan.data.sources import source_label
from covidscan.data.splits import load_splits
from covidscan.data.volumes import STACK_SEPARATOR
from covidscan.evaluation.aggregate import Aggregation, aggregate_by_patient
from covidscan.evaluation.bootstrap import attach_intervals, bootstrap_metrics
from covidscan.evaluation.calibration import (
    apply_temperature,
    fit_temperature,
    reliability_table,
)
from covidscan.evaluation.metrics import (
    PredictionSet,
    compute_metrics,
    confusion_counts,
    normalise_confusion,
    per_class_report,
    predict_labels,
    resolve_positive_class,
)
from covidscan.evaluation.operating_point import OperatingPoint, ThresholdMethod, choose_threshold
from covidscan.evaluation.results import (
    BootstrapInfo,
    CalibrationSummary,
    ConfusionMatrix,
    EvaluationReport,
    Metrics,
    PatientLevel,
    SourceMetrics,
    ThresholdMetrics,
)
from covidscan.explain.lung_check import CAM_OUTSIDE_WARNING, cam_lung_check
from covidscan.inference import NON_FINITE_OUTPUT, Predictor, load_predictor
from covidscan.notices import warn_once
from covidscan.progress import progress
from covidscan.runtime import atomic_path, write_json

logger = logging.getLogger(__name__)

EXTERNAL_WARNING = (
    "External evaluation: this dataset was never seen in training. A drop from the internal test "
    "metrics measures domain shift (scanner, protocol, population, image source); a model that scored "
    "well internally but not here may have learned shortcuts (source-specific text, borders, image "
    "statistics) rather than disease."
)

SAME_SCORE_RANGE = 1e-6  # positive-class scores spread less than this: the model ranks nothing


class EmptySplitError(DataError):
    """The requested split holds no samples (e.g. ``test`` of a run split into train/val only)."""


class UnknownSplitError(DataError):
    """The model's own split cannot be known (no run directory, or a run without ``splits.csv``)."""


@dataclass
class EvaluationSet:
    """What is evaluated: the samples and a plain description of where they came from."""

    samples: list[Sample]
    dataset: str  # the --data spec, or the run's own data source
    split: str  # "test", "val", ... or "all" when the data has no split column
    name: str  # the output folder name under <run>/evaluation/
    external: bool
    label_map: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable, left out


@dataclass
class Evaluation:
    """Everything one evaluation produced; ``report.to_dict()`` is what ``metrics.json`` holds."""

    report: EvaluationReport
    predictions: PredictionSet
    predicted: np.ndarray  # arg-max class index per item
    predictor: Predictor
    out_dir: Path
    name: str = ""  # the set's name: the split, external-<dataset> or <dataset>-<split>
    sources: list[str | None] = field(default_factory=list)  # Sample.source of each item


def dataset_name(spec: str) -> str:
    """A dataset spec's short name: a manifest's folder, else the folder (``covid-ct/metadata.csv`` -> ``covid-ct``)."""
    path = Path(spec)
    return path.parent.name if path.suffix.lower() == ".csv" else (path.name or str(spec))


def _run_splits(run_dir: Path | None, source: Path) -> Path:
    if run_dir is None:
        raise UnknownSplitError(
            f"{source}: no training run is known for this model, so it has no test split; pass --data with "
            "a dataset to evaluate on, or --checkpoint RUN (the run an ONNX export was made from)"
        )
    path = run_dir / "splits.csv"
    if not path.is_file():
        raise UnknownSplitError(
            f"{run_dir}: no splits.csv in this run directory, so its test split is unknown; "
            "pass --data with a dataset to evaluate on"
        )
    return path


def select_samples(
    predictor: Predictor, data: str | Path | None, split: str, label_map: dict[str, str] | None, external: bool
) -> EvaluationSet:
    """The run's own split (``data`` None) or a dataset spec, checked against the model's classes."""
    mapping = {**predictor.config.data.label_map, **(label_map or {})}
    limits = predictor.config.data.limits
    if data is None:
        if external:
            raise DataError("--external needs --data: the dataset the model never saw")
        sample_set = load_splits(_run_splits(predictor.run_dir, predictor.source))
        samples = [s for s in sample_set.samples if s.split == split]
        if mapping:
            samples = [replace(s, label=None if s.label is None else mapping.get(s.label, s.label)) for s in samples]
        samples, skipped = verify_readable(samples, decode=True, limits=limits)  # one bad file never ends the run
        dataset, used_split, name = source_label(predictor.config.data.source), split, split
    else:
        sample_set = load_samples(data, label_map=mapping, require_labels=False, skip_bad=True, limits=limits)
        skipped = sample_set.skipped
        has_splits = all(s.split for s in sample_set.samples)
        samples = [s for s in sample_set.samples if s.split == split] if has_splits else sample_set.samples
        used_split = split if has_splits else "all"
        dataset = str(data)
        base = dataset_name(dataset)
        name = f"external-{base}" if external else f"{base}-{used_split}"
    if not samples and skipped:
        raise DataError(
            f"{dataset}: none of the {len(skipped)} file(s) to evaluate could be read (first: {skipped[0][0]}: "
            f"{skipped[0][1]}); check that the data is where the run's splits.csv says"
        )
    if not samples:
        raise EmptySplitError(
            f"{dataset}: split {split!r} holds no samples; nothing to evaluate. Choose another "
            "--split (train/val/test; e.g. --split val for a run split into train/val only) or check the "
            "run's splits.csv"
        )
    unlabeled = [s.path for s in samples if s.label is None]
    if unlabeled:
        raise DataError(
            f"{unlabeled[0]}: no label ({len(unlabeled)} unlabeled items); evaluation needs labels "
            "(use `covidscan predict` for unlabeled images)"
        )
    unknown = sorted({s.label for s in samples if s.label is not None} - set(predictor.class_names))
    if unknown:
        raise DataError(
            f"{dataset}: labels {unknown} are not among the model's classes {predictor.class_names}; map "
            f"them with --label-map {unknown[0]}=CLASS (CLASS one of {predictor.class_names})"
        )
    return EvaluationSet(samples, dataset, used_split, name, external, mapping, skipped)


def predict(
    predictor: Predictor, samples: Sequence[Sample], batch_size: int | None = None, desc: str = "evaluate"
) -> PredictionSet:
    """Class probabilities for every item of ``samples`` (one item per image or per slice stack).

    Items whose model output is not finite are refused by name: metrics cannot be computed over
    them, and dropping them silently would bias every number."""
    config = predictor.config
    dataset = predictor.dataset(samples)
    if len(dataset) == 0:
        raise DataError("the evaluation set is empty after loading (no image or slice stack could be built)")
    loader = DataLoader(
        dataset, batch_size=batch_size or config.training.batch_size, shuffle=False, num_workers=config.data.num_workers
    )
    probabilities, labels, errors = [], [], []
    for views, targets in progress(loader, desc=desc, unit="batch"):
        batch_probabilities, batch_errors = predictor.predict_items(views)
        probabilities.append(batch_probabilities)
        errors.extend(batch_errors)
        labels.append(torch.as_tensor(targets).numpy())
    items = dataset.item_samples
    bad = [items[i].path for i, error in enumerate(errors) if error]
    if bad:
        raise DataError(f"{bad[0]} ({len(bad)} item(s) in all, e.g. {bad[:3]}): {NON_FINITE_OUTPUT}")
    return PredictionSet(
        np.concatenate(labels),
        np.concatenate(probabilities),
        predictor.class_names,
        paths=[s.path for s in items],
        patient_ids=[s.patient_id for s in items],
    )


def metrics_with_ci(
    predictions: PredictionSet, positive: int, n_bootstrap: int, seed: int, threshold: float | None = None
) -> tuple[Metrics, BootstrapInfo]:
    """Point metrics with percentile-bootstrap 95% CIs (patients resampled when ids exist)."""
    values = compute_metrics(predictions, positive, threshold)
    by_patient = predictions.has_patients()
    if n_bootstrap > 0:
        attach_intervals(
            values,
            bootstrap_metrics(
                predictions, positive, n_resamples=n_bootstrap, seed=seed, by_patient=by_patient, threshold=threshold
            ),
        )
    info = BootstrapInfo(n_bootstrap, 0.95, "nonparametric percentile", "patient" if by_patient else "item", seed)
    return values, info


def _confusion(predictions: PredictionSet, positive: int, threshold: float | None = None) -> ConfusionMatrix:
    counts = confusion_counts(predictions, positive, threshold)
    return ConfusionMatrix(counts.tolist(), normalise_confusion(counts).round(4).tolist())


def _write_predictions(
    path: Path,
    predictions: PredictionSet,
    predicted: np.ndarray,
    at_threshold: np.ndarray | None,
    sources: Sequence[str | None],
) -> None:
    names = predictions.class_names
    header = ["path", "patient_id", "true", "predicted"] + [f"prob_{n}" for n in names]
    if at_threshold is not None:
        header.append("predicted_at_threshold")
    with_sources = any(sources)
    if with_sources:
        header.append("source")
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(len(predictions)):
            row = [
                predictions.paths[i],
                predictions.patient_ids[i] or "",
                names[predictions.y_true[i]],
                names[predicted[i]],
                *(f"{p:.6f}" for p in predictions.proba[i]),
            ]
            if at_threshold is not None:
                row.append(names[at_threshold[i]])
            if with_sources:
                row.append(sources[i] or "")
            writer.writerow(row)


def _validation_predictions(predictor: Predictor, batch_size: int | None) -> PredictionSet | None:
    """The run's own validation split, where thresholds and temperatures are fitted."""
    if predictor.run_dir is None or not (predictor.run_dir / "splits.csv").is_file():
        return None
    samples = [s for s in load_splits(predictor.run_dir / "splits.csv").samples if s.split == "val"]
    samples = [s for s in samples if s.label in predictor.class_names]
    return predict(predictor, samples, batch_size, desc="validation") if samples else None


def _same_score_warning(predictions: PredictionSet, positive: int) -> str | None:
    """Why the metrics mean nothing when the model gives every item the same score (an untrained or
    collapsed model, a broken checkpoint): its AUC is 0.5 with a zero-width CI, which reads like a
    measurement. None when the scores differ."""
    scores = predictions.proba[:, positive]
    if len(scores) < 2 or np.ptp(scores) >= SAME_SCORE_RANGE:
        return None
    return (
        f"the model gave the same score (P({predictions.class_names[positive]}) = {scores[0]:.4f}) to all "
        f"{len(scores)} items: its AUC is meaningless and its other metrics only say which class that score "
        "falls on; check the checkpoint and its training"
    )


def _warnings(chosen: EvaluationSet, predictions: PredictionSet, positive: int, model: str) -> list[str]:
    """What a reader must know before trusting the numbers of this set (the gravest also warned once
    per ``model``, for Python-API users who never open the report)."""
    warnings = []
    same_score = _same_score_warning(predictions, positive)
    if same_score:
        warnings.append(same_score)
        warn_once(f"same-score:{model}", f"{model}: {same_score}")
    if chosen.external:
        warnings.append(EXTERNAL_WARNING)
    elif chosen.split == "all":
        warnings.append(
            f"{chosen.dataset} has no split column, so all its samples were evaluated; if the model was "
            "trained on it, this includes training images. Omit --data to evaluate the run's test "
            "split, or pass --external for a dataset the model never saw"
        )
    if chosen.skipped:
        warnings.append(
            f"{len(chosen.skipped)} file(s) could not be read and were left out (listed under 'skipped'), "
            f"first: {chosen.skipped[0][0]}: {chosen.skipped[0][1]}"
        )
    absent = [c for i, c in enumerate(predictions.class_names) if not np.any(predictions.y_true == i)]
    if absent:
        warnings.append(f"class(es) {absent} do not occur in this set; metrics needing them are undefined")
    if not predictions.has_patients():
        warnings.append(
            "no patient ids: CIs resample images as if independent; slices of one patient are "
            "correlated, so the intervals may be too narrow"
        )
    return warnings


def _calibrate(
    predictions: PredictionSet, validation: PredictionSet | None, temperature_scaling: bool, run_dir: Path | None
) -> CalibrationSummary:
    """ECE and reliability table; with ``temperature_scaling`` first rescale both sets in place by a
    temperature fitted on validation."""
    ece_before = reliability_table(predictions.proba, predictions.y_true).ece
    temperature = None
    if temperature_scaling:
        if validation is None:
            raise DataError(
                f"{run_dir}: temperature scaling needs the run's validation split (splits.csv with val rows)"
            )
        temperature = fit_temperature(validation.proba, validation.y_true)
        predictions.proba = apply_temperature(predictions.proba, temperature)
        validation.proba = apply_temperature(validation.proba, temperature)
    reliability = reliability_table(predictions.proba, predictions.y_true)
    return CalibrationSummary(
        ece_before_scaling=ece_before,
        ece=reliability.ece,
        reliability=reliability.to_dict(),
        bins="15 equal-width bins of top-class confidence",
        temperature=temperature,
    )


def _item_sources(predictions: PredictionSet, samples: Sequence[Sample]) -> list[str | None]:
    """The source of each predicted item (a slice stack ``<scan>#stack<k>`` belongs to its scan's)."""
    by_path = {s.path: s.source for s in samples}
    return [by_path.get(path.split(STACK_SEPARATOR)[0]) for path in predictions.paths]


def _subset(predictions: PredictionSet, mask: np.ndarray) -> PredictionSet:
    keep = np.flatnonzero(mask)
    return PredictionSet(
        predictions.y_true[keep],
        predictions.proba[keep],
        predictions.class_names,
        paths=[predictions.paths[i] for i in keep],
        patient_ids=[predictions.patient_ids[i] for i in keep],
    )


def per_source_metrics(
    predictions: PredictionSet,
    sources: Sequence[str | None],
    positive: int,
    n_bootstrap: int,
    seed: int,
    threshold: float | None = None,
) -> dict[str, SourceMetrics]:
    """Metrics with CIs for each source's items (and at ``threshold``); empty unless the items come
    from two or more sources. Items without a source are grouped as ``(no source)``."""
    names = [source or "(no source)" for source in sources]
    if len(set(names)) < 2:
        return {}
    parts = {}
    for name in dict.fromkeys(names):
        part = _subset(predictions, np.array([n == name for n in names]))
        values, info = metrics_with_ci(part, positive, n_bootstrap, seed)
        at_threshold = None
        if threshold is not None:
            at_threshold, _ = metrics_with_ci(part, positive, n_bootstrap, seed, threshold)
        parts[name] = SourceMetrics(
            n_items=len(part),
            n_patients=len(np.unique(part.groups())) if part.has_patients() else None,
            class_counts=dict(Counter(part.class_names[y] for y in part.y_true)),
            metrics=values,
            bootstrap=info,
            at_threshold=at_threshold,
        )
    return parts


def evaluate(
    run: str | Path | None,
    data: str | Path | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    label_map: dict[str, str] | None = None,
    n_bootstrap: int = 1000,
    external: bool = False,
    *,
    positive_class: str | None = None,
    target_sensitivity: float | None = None,
    temperature_scaling: bool = False,
    aggregation: Aggregation = "mean",
    batch_size: int | None = None,
    seed: int = 0,
    write: bool = True,
    name: str | None = None,
    grid_size: int = 16,
    onnx: str | Path | None = None,
    tta: str | Sequence[str] | None = None,
    cam_lung: int = 0,
) -> Evaluation:
    """Full evaluation of one run; see :func:`evaluate_run` for the arguments. ``write=False`` only
    computes (``compare`` uses it, so comparing never overwrites a run's own evaluation files).
    ``name`` replaces the set's default name (its folder under ``<run>/evaluation/``); ``grid_size``
    images go into the prediction grid (0: none)."""
    predictor = load_predictor(run, onnx, tta=tta)
    chosen = select_samples(predictor, data, split, label_map, external)
    if name:
        chosen.name = name
    class_names = predictor.class_names
    positive = resolve_positive_class(class_names, positive_class or predictor.config.data.positive_class)
    predictions = predict(predictor, chosen.samples, batch_size)
    validation = _validation_predictions(predictor, batch_size)
    calibration = _calibrate(predictions, validation, temperature_scaling, predictor.run_dir)
    values, bootstrap_info = metrics_with_ci(predictions, positive, n_bootstrap, seed)
    predicted = predict_labels(predictions.proba, positive)
    report = EvaluationReport(
        run=str(predictor.run_dir) if predictor.run_dir else None,
        checkpoint=str(predictor.source),
        model=predictor.card.architecture,
        **predictor.describe(),
        dataset=chosen.dataset,
        split=chosen.split,
        external=chosen.external,
        label_map=chosen.label_map,
        class_names=class_names,
        positive_class=class_names[positive],
        n_items=len(predictions),
        n_patients=len(np.unique(predictions.groups())) if predictions.has_patients() else None,
        class_counts=dict(Counter(class_names[y] for y in predictions.y_true)),
        metrics=values,
        bootstrap=bootstrap_info,
        confusion_matrix=_confusion(predictions, positive),
        per_class=per_class_report(predictions, positive),
        calibration=calibration,
        warnings=_warnings(chosen, predictions, positive, str(predictor.source)),
        skipped=list(chosen.skipped),
    )

    operating = _operating_point(validation, positive, target_sensitivity)
    if isinstance(operating, OperatingPoint):
        op_values, _ = metrics_with_ci(predictions, positive, n_bootstrap, seed, operating.threshold)
        report.operating_point = ThresholdMetrics(
            operating, op_values, _confusion(predictions, positive, operating.threshold)
        )
        if data is None and split == "val":
            report.warnings.append(
                "the threshold was chosen on this same val split, so the metrics at the "
                "operating point are optimistic; read them on the test split"
            )
    else:
        report.operating_point_skipped = operating

    if predictions.has_patients() and len(np.unique(predictions.groups())) < len(predictions):
        patients = aggregate_by_patient(predictions, aggregation)
        patient_values, patient_info = metrics_with_ci(patients, positive, n_bootstrap, seed)
        report.patient_level = PatientLevel(
            aggregation, len(patients), patient_values, patient_info, _confusion(patients, positive)
        )

    sources = _item_sources(predictions, chosen.samples)
    threshold = report.operating_point.point.threshold if report.operating_point else None
    report.per_source = per_source_metrics(predictions, sources, positive, n_bootstrap, seed, threshold)
    if cam_lung > 0:
        _check_cam_lung(report, predictor, chosen.samples, cam_lung, seed)

    out = Path(out_dir) if out_dir is not None else default_out_dir(predictor, chosen.name)
    evaluation = Evaluation(report, predictions, predicted, predictor, out, chosen.name, sources)
    if write:
        write_evaluation_files(evaluation, grid_size, seed)
    logger.info(
        "evaluation of %s on %s (%s): %s",
        predictor.run_dir or predictor.source,
        chosen.dataset,
        chosen.split,
        ", ".join(f"{n}={v.value:.3f}" for n, v in values.items() if v.value is not None),
    )
    return evaluation


def _check_cam_lung(
    report: EvaluationReport, predictor: Predictor, samples: Sequence[Sample], max_images: int, seed: int
) -> None:
    """Where the model looks on (a seeded sample of) this set: its Grad-CAM mass outside the lungs."""
    if predictor.spatial_dims != 2:
        report.warnings.append("cam_lung: the lung check measures 2D slice models only; not measured")
        return
    report.cam_lung = cam_lung_check(predictor, samples, max_images=max_images, seed=seed)
    share = report.cam_lung["mean_outside_share"]
    if share is not None and share >= CAM_OUTSIDE_WARNING:
        report.warnings.append(
            f"on average {share:.0%} of the model's Grad-CAM mass lies outside the lungs: it may rely on "
            "shortcuts (borders, text, body outline); see the shortcut audit (covidscan data shortcuts)"
        )


def default_out_dir(predictor: Predictor, name: str) -> Path:
    """``<run>/evaluation/<name>``; ONNX Runtime and TTA results get their own folder beside the plain ones."""
    suffix = "".join(
        [
            "-onnx" if "onnxruntime" in predictor.engine else "",
            "-tta" if predictor.tta != ("identity",) else "",
        ]
    )
    root = predictor.run_dir or predictor.source.parent
    return root / "evaluation" / f"{name}{suffix}"


def write_evaluation_files(evaluation: Evaluation, grid_size: int = 16, seed: int = 0) -> None:
    """``predictions.csv``, figures, ``report.html``/``report.md`` and ``metrics.json`` into
    ``evaluation.out_dir`` (kept apart from computing, so a caller can choose the folder later)."""
    from covidscan.evaluation.report import write_evaluation_report

    report, predictions, out = evaluation.report, evaluation.predictions, evaluation.out_dir
    threshold = report.operating_point.point.threshold if report.operating_point else None
    at_threshold = (
        predict_labels(predictions.proba, report.positive_index, threshold) if threshold is not None else None
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", predictions, evaluation.predicted, at_threshold, evaluation.sources)
    reliability = reliability_table(predictions.proba, predictions.y_true)  # after any temperature scaling
    report.figures = write_evaluation_report(evaluation, reliability, grid_size, seed)
    write_json(out / "metrics.json", report.to_dict())


def _operating_point(
    validation: PredictionSet | None, positive: int, target_sensitivity: float | None
) -> OperatingPoint | str:
    """The val-chosen threshold, or the reason there is none."""
    if validation is None:
        return "no validation split in the run's splits.csv"
    is_positive = validation.y_true == positive
    if is_positive.all() or not is_positive.any():
        return "the validation split holds only one class"
    method: ThresholdMethod = "sensitivity" if target_sensitivity is not None else "youden"
    return choose_threshold(
        is_positive,
        validation.proba[:, positive],
        method=method,
        target_sensitivity=target_sensitivity or 0.95,
        chosen_on=f"val ({len(validation)} items)",
    )


def evaluate_run(
    run: str | Path | None,
    data: str | Path | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    label_map: dict[str, str] | None = None,
    n_bootstrap: int = 1000,
    external: bool = False,
    **options: Any,
) -> EvaluationReport:
    """Evaluate a run directory (or checkpoint) and write ``metrics.json``, ``predictions.csv``,
    figures and ``report.html``/``report.md`` under ``<run>/evaluation/<name>/``; return the report
    (``report.to_dict()`` is ``metrics.json``).

    ``data`` None evaluates the run's own ``split`` from its ``splits.csv``; otherwise any dataset
    spec ``load_samples`` takes (folder or manifest), whose ``split`` is used when it has a split
    column and all of it otherwise. ``label_map`` renames raw labels to the model's classes.
    ``options``: ``positive_class``, ``target_sensitivity`` (else Youden's J), ``temperature_scaling``,
    ``aggregation`` ("mean"/"max" per patient), ``batch_size``, ``seed``, ``name``, ``grid_size``
    (images in ``prediction_grid.png``, study D's figure; 0 for none), ``onnx`` (an export run with
    ONNX Runtime; ``run`` may then be None, or the run it came from), ``tta`` (test-time augmentation
    views, e.g. "identity,hflip"), ``cam_lung`` (Grad-CAM maps of up to that many images — a seeded
    sample — measure the share of the model's attention outside the lungs; 2D CT models; 0: off).
    ``run`` may also be an ensemble directory.
    """
    return evaluate(run, data, split, out_dir, label_map, n_bootstrap, external, **options).report
