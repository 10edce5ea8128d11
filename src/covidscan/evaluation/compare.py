"""Compare several trained runs on the same test items or patients: study A's table plus pairwise tests.

Each run is evaluated with :func:`~covidscan.evaluation.evaluate.evaluate` without writing into
the run (``covidscan evaluate`` gives each run its full report). At *item* level the comparison
checks that every run scored exactly the same items; at *patient* level it first aggregates each
run's predictions per patient, so runs that cut the same scans into different slice stacks (study
C's depths) are compared on the same patients. Then it ranks the runs by one metric and tests
every pair (McNemar, Fisher's exact, DeLong, paired bootstrap differences).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from covidscan.data.records import DataError
from covidscan.data.volumes import STACK_SEPARATOR
from covidscan.errors import UsageError
from covidscan.evaluation.aggregate import Aggregation, aggregate_by_patient
from covidscan.evaluation.bootstrap import paired_bootstrap_difference
from covidscan.evaluation.evaluate import EmptySplitError, Evaluation, evaluate
from covidscan.evaluation.metrics import (
    METRIC_LABELS,
    MetricValue,
    PredictionSet,
    compute_metrics,
    metric_names,
    predict_labels,
)
from covidscan.evaluation.report import prediction_grid, render
from covidscan.evaluation.results import BootstrapInfo, Comparison, ComparisonRow, Metrics, PairComparison
from covidscan.evaluation.stats import compare_predictions
from covidscan.runtime import atomic_path, write_json, write_text

logger = logging.getLogger(__name__)

Level = Literal["auto", "item", "patient"]
LEVELS: tuple[str, ...] = get_args(Level)


def _run_dir(evaluation: Evaluation) -> Path:
    """The compared run's directory (compare takes runs, whose directories hold their splits)."""
    if evaluation.predictor.run_dir is None:
        raise UsageError(f"{evaluation.predictor.card.model_id}: compare needs run directories, not exported models")
    return evaluation.predictor.run_dir


def _run_row(evaluation: Evaluation, metrics: Metrics, name: str) -> ComparisonRow:
    """Runtime and parameter count: from the run's training metrics.json when present."""
    run_dir = _run_dir(evaluation)
    training: dict[str, Any] = {}
    if (run_dir / "metrics.json").is_file():
        try:
            training = json.loads((run_dir / "metrics.json").read_text())
        except json.JSONDecodeError:
            logger.warning("%s: unreadable metrics.json; runtime not shown", run_dir)
    parameters = evaluation.predictor.parameter_count()
    return ComparisonRow(
        run=name,
        run_dir=str(run_dir),
        model=evaluation.predictor.card.architecture,
        parameters=int(training.get("parameters") or parameters),
        runtime_seconds=training.get("runtime_seconds"),
        metrics=metrics,
    )


def _resolve_level(level: Level, evaluations: list[Evaluation]) -> Level:
    """``auto``: patient level as soon as one run scored volume stacks (stacks of one scan are not
    independent, and two depths cut different stacks), item level otherwise."""
    if level != "auto":
        return level
    stacks = any(STACK_SEPARATOR in path for e in evaluations for path in e.predictions.paths)
    return "patient" if stacks else "item"


def _descending(value: float | None) -> float:
    """Sort key: larger values first, undefined ones last."""
    return -value if value is not None else np.inf


def _compared_set(evaluation: Evaluation, level: str, aggregation: Aggregation) -> PredictionSet:
    """What the tests pair: the evaluated items, or one row per patient keyed by its id (an item
    without one stands alone, keyed by its path)."""
    if level == "item":
        return evaluation.predictions
    patients = aggregate_by_patient(evaluation.predictions, aggregation)
    return PredictionSet(
        patients.y_true,
        patients.proba,
        patients.class_names,
        paths=[str(patient) for patient in patients.patient_ids],  # every aggregated row has an id
        patient_ids=patients.patient_ids,
    )


def _level_metrics(evaluation: Evaluation, level: str) -> tuple[Metrics, BootstrapInfo]:
    """(metrics, bootstrap info) at ``level``. ``evaluate`` omits ``patient_level`` exactly when every
    patient has one item, where patient and item metrics are the same."""
    patient_level = evaluation.report.patient_level
    if level == "patient" and patient_level is not None:
        return patient_level.metrics, patient_level.bootstrap
    return evaluation.report.metrics, evaluation.report.bootstrap


def _aligned(sets: list[PredictionSet], evaluations: list[Evaluation], level: str) -> list[PredictionSet]:
    """Every set reordered to the first one's items (or patients); an error unless all runs scored
    the same ones with the same labels and classes."""
    reference, reference_run = sets[0], _run_dir(evaluations[0])
    index = {path: i for i, path in enumerate(reference.paths)}
    unit = "items" if level == "item" else "patients"
    aligned = []
    for predictions, evaluation in zip(sets, evaluations):
        run_dir, paths = _run_dir(evaluation), predictions.paths
        if predictions.class_names != reference.class_names:
            raise DataError(
                f"{run_dir}: classes {predictions.class_names} differ from {reference.class_names} of "
                f"{reference_run}; only models with the same classes can be compared"
            )
        if len(paths) != len(index) or set(paths) != set(index):
            stacks = any(STACK_SEPARATOR in path for path in [*paths, *index])
            fix = (
                "the runs cut the scans into different stacks (different data.depth?): compare per patient "
                "with --level patient"
                if level == "item" and stacks
                else "pass --data with one common test set, or compare runs trained with the same splits file "
                "(data.split.method: file)"
            )
            raise DataError(
                f"{run_dir} was evaluated on different {unit} than {reference_run} ({len(paths)} vs "
                f"{len(index)}; e.g. {sorted(set(paths) ^ set(index))[:1]}); {fix}"
            )
        order = np.empty(len(paths), dtype=int)
        order[[index[p] for p in paths]] = np.arange(len(paths))
        reordered = PredictionSet(
            predictions.y_true[order],
            predictions.proba[order],
            predictions.class_names,
            paths=[paths[i] for i in order],
            patient_ids=[predictions.patient_ids[i] for i in order],
        )
        disagree = np.flatnonzero(reordered.y_true != reference.y_true)
        if disagree.size:
            first = int(disagree[0])
            raise DataError(
                f"{run_dir}: {reordered.paths[first]!r} is labelled "
                f"{reordered.class_names[reordered.y_true[first]]!r} but "
                f"{reference.class_names[reference.y_true[first]]!r} in {reference_run} "
                f"({disagree.size} {unit} disagree); check the runs' data.label_map or --label-map"
            )
        aligned.append(reordered)
    return aligned


def _differences(a: PredictionSet, b: PredictionSet, positive: int, n_bootstrap: int, seed: int) -> Metrics:
    """Metric of A minus metric of B with a paired bootstrap CI (same resamples for both)."""
    values_a, values_b = compute_metrics(a, positive), compute_metrics(b, positive)
    intervals = (
        paired_bootstrap_difference(a, b, positive, n_resamples=n_bootstrap, seed=seed) if n_bootstrap > 0 else {}
    )
    differences = {}
    for name, metric_a in values_a.items():
        value_a, value_b = metric_a.value, values_b[name].value
        defined = value_a is not None and value_b is not None
        interval = intervals.get(name, {})
        differences[name] = MetricValue(
            value=value_a - value_b if value_a is not None and value_b is not None else None,
            undefined=None if defined else "undefined for at least one model",
            ci_low=interval.get("ci_low") if defined else None,
            ci_high=interval.get("ci_high") if defined else None,
        )
    return differences


def _evaluate_all(
    runs: list[str | Path], data: str | Path | None, split: str | None, **options: Any
) -> tuple[list[Evaluation], list[str]]:
    """Every run evaluated on ``split`` (never written into the run). ``split`` None means the test
    split, or val when the runs' own splits have no test items (study A: train/val only), which is
    stated in the returned notes."""
    notes = []
    try:
        first = evaluate(runs[0], data, split or "test", **options)
    except EmptySplitError:
        if split is not None or data is not None:
            raise
        split = "val"
        first = evaluate(runs[0], data, split, **options)
        notes.append(
            "the runs' splits hold no test items (train/val only), so they are compared on val; val also "
            "chose each run's best checkpoint, so these numbers are optimistic: hold out a test split "
            "for a final comparison"
        )
    evaluations = [first] + [evaluate(run, data, split or "test", **options) for run in runs[1:]]
    return evaluations, notes


def compare_runs(
    runs: list[str | Path],
    data: str | Path | None = None,
    split: str | None = None,
    metric: str = "f1",
    out_dir: str | Path | None = None,
    n_bootstrap: int = 1000,
    label_map: dict[str, str] | None = None,
    external: bool = False,
    *,
    positive_class: str | None = None,
    grid_size: int = 16,
    seed: int = 0,
    level: Level = "auto",
    aggregation: Aggregation = "mean",
    row_names: Sequence[str] | None = None,
) -> Comparison:
    """Evaluate ``runs`` on the same items and write ``comparison.{html,md,csv,json}`` plus one
    prediction grid per run into ``out_dir`` (default: ``comparisons/`` beside the first run).

    ``split`` None compares on the runs' test split, falling back to val (with a note in the
    report) when their splits have none. ``level="patient"`` aggregates each run's items per patient
    (``aggregation`` "mean" or "max" of the probabilities) before aligning, ranking and testing, so
    runs with different slice stacks of the same scans can be compared; ``"auto"`` (default) picks it
    when the items are volume stacks. ``row_names`` labels the rows, pairs and grids (default: each run
    directory's name); a study table gives two checkpoints of one run distinct names.
    """
    if len(runs) < 2:
        raise UsageError("compare needs at least two runs")
    if row_names is not None and (len(row_names) != len(runs) or len(set(row_names)) != len(row_names)):
        raise UsageError(f"row_names must name each run once, distinctly; got {list(row_names)} for {len(runs)} runs")
    if level not in LEVELS:
        raise UsageError(f"level must be one of {LEVELS}, got {level!r}")
    if aggregation not in ("mean", "max"):
        raise UsageError(f"aggregation must be 'mean' or 'max', got {aggregation!r}")
    evaluations, notes = _evaluate_all(
        runs,
        data,
        split,
        label_map=label_map,
        n_bootstrap=n_bootstrap,
        external=external,
        positive_class=positive_class,
        aggregation=aggregation,
        seed=seed,
        write=False,
    )
    names = metric_names(evaluations[0].predictions.num_classes)
    if metric not in names:
        raise UsageError(f"--metric {metric!r} is not one of {list(names)}")
    level = _resolve_level(level, evaluations)
    aligned = _aligned([_compared_set(e, level, aggregation) for e in evaluations], evaluations, level)
    reference = evaluations[0].report
    positive = reference.positive_index
    y_true = aligned[0].y_true

    labels = list(row_names) if row_names is not None else [_run_dir(e).name for e in evaluations]
    rows = [_run_row(e, _level_metrics(e, level)[0], label) for e, label in zip(evaluations, labels)]
    rows.sort(key=lambda row: _descending(row.metrics[metric].value))
    for rank, row in enumerate(rows, start=1):
        row.rank = rank

    out = (
        Path(out_dir)
        if out_dir is not None
        else _run_dir(evaluations[0]).parent / "comparisons" / (f"{reference.split}-" + "-vs-".join(labels)[:120])
    )
    out.mkdir(parents=True, exist_ok=True)
    predicted = [predict_labels(a.proba, positive) for a in aligned]
    pairs = []
    for (i, a), (j, b) in combinations(enumerate(aligned), 2):
        tests = compare_predictions(
            y_true, predicted[i], predicted[j], positive, a.proba[:, positive], b.proba[:, positive]
        )
        pairs.append(
            PairComparison(
                labels[i],
                labels[j],
                tests,
                _differences(a, b, positive, n_bootstrap, seed),
            )
        )
    grids = {}
    shown = evaluations if level == "item" else []  # a patient is several images: none to show
    for evaluation, name in zip(shown, labels):
        grid = prediction_grid(evaluation, out / f"grid-{name}.png", grid_size, seed)
        if grid is not None:
            grids[name] = grid.name

    comparison = Comparison(
        dataset=reference.dataset,
        split=reference.split,
        external=reference.external,
        level=level,
        aggregation=aggregation if level == "patient" else None,
        n_compared=len(y_true),
        positive_class=reference.positive_class,
        ranked_by=metric,
        metrics=list(names),
        bootstrap=_level_metrics(evaluations[0], level)[1],
        rows=rows,
        pairs=pairs,
        grids=grids,
        notes=notes,
        out_dir=out,
    )
    _write_csv(out / "comparison.csv", comparison)
    context = {"c": comparison, "labels": METRIC_LABELS, "out_dir": out}
    write_text(out / "comparison.html", render("comparison.html.j2", **context))
    write_text(out / "comparison.md", render("comparison.md.j2", **context))
    write_json(out / "comparison.json", comparison.to_dict())
    return comparison


def _write_csv(path: Path, comparison: Comparison) -> None:
    """One row per run; ``level``/``aggregation``/``n_compared`` on every row so a row read alone
    still says what its numbers are per."""
    names = comparison.metrics
    header = ["rank", "run", "model", "parameters", "runtime_seconds", "level", "aggregation", "n_compared"]
    for name in names:
        header += [name, f"{name}_ci_low", f"{name}_ci_high"]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in comparison.rows:
            line = [
                row.rank,
                row.run,
                row.model,
                row.parameters,
                row.runtime_seconds,
                comparison.level,
                comparison.aggregation,
                comparison.n_compared,
            ]
            for name in names:
                m = row.metrics[name]
                line += [m.value, m.ci_low, m.ci_high]
            writer.writerow(["" if v is None else v for v in line])
