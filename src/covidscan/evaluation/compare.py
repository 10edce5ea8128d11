"""Compare several trained runs on the same test items: study A's table plus pairwise tests.

Each run is evaluated with :func:`~covidscan.evaluation.evaluate.evaluate` without writing into
the run (``covidscan evaluate`` gives each run its full report); the comparison then checks that every run scored exactly the same items, ranks
the runs by one metric and tests every pair (McNemar, Fisher's exact, DeLong).
"""

from __future__ import annotations

import csv
import json
import logging
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from covidscan.data import read_image
from covidscan.data.records import DataError
from covidscan.evaluation.bootstrap import paired_bootstrap_difference
from covidscan.evaluation.evaluate import Evaluation, evaluate
from covidscan.evaluation.metrics import METRIC_LABELS, PredictionSet, compute_metrics, metric_names
from covidscan.evaluation.plots import plot_prediction_grid
from covidscan.evaluation.report import render, write_text
from covidscan.evaluation.stats import compare_predictions
from covidscan.runtime import write_json

logger = logging.getLogger(__name__)


def _run_info(evaluation: Evaluation) -> dict[str, Any]:
    """Runtime and parameter count: from the run's training metrics.json when present."""
    run_dir = evaluation.loaded.run_dir
    training: dict[str, Any] = {}
    if (run_dir / "metrics.json").is_file():
        try:
            training = json.loads((run_dir / "metrics.json").read_text())
        except json.JSONDecodeError:
            logger.warning("%s: unreadable metrics.json; runtime not shown", run_dir)
    parameters = sum(p.numel() for p in evaluation.loaded.model.parameters())
    return {"run": run_dir.name, "run_dir": str(run_dir), "model": evaluation.loaded.config.model.name,
            "parameters": int(training.get("parameters") or parameters),
            "runtime_seconds": training.get("runtime_seconds")}


def _aligned(evaluations: list[Evaluation]) -> list[np.ndarray]:
    """Per run, the item order matching the first run; an error unless all runs scored the same items."""
    reference = evaluations[0]
    index = {path: i for i, path in enumerate(reference.predictions.paths)}
    orders = []
    for evaluation in evaluations:
        paths = evaluation.predictions.paths
        if evaluation.predictions.class_names != reference.predictions.class_names:
            raise DataError(f"{evaluation.loaded.run_dir}: classes {evaluation.predictions.class_names} differ from "
                            f"{reference.predictions.class_names} of {reference.loaded.run_dir}; only models with "
                            "the same classes can be compared")
        if len(paths) != len(index) or set(paths) != set(index):
            raise DataError(f"{evaluation.loaded.run_dir} was evaluated on different items than "
                            f"{reference.loaded.run_dir} ({len(paths)} vs {len(index)}; e.g. "
                            f"{sorted(set(paths) ^ set(index))[:1]}); pass --data with one common test set, or "
                            "compare runs trained with the same splits file (data.split.method: file)")
        order = np.empty(len(paths), dtype=int)
        order[[index[p] for p in paths]] = np.arange(len(paths))
        orders.append(order)
    return orders


def _reordered(predictions: PredictionSet, order: np.ndarray) -> PredictionSet:
    return PredictionSet(predictions.y_true[order], predictions.proba[order], predictions.class_names,
                         paths=[predictions.paths[i] for i in order],
                         patient_ids=[predictions.patient_ids[i] for i in order])


def _differences(a: PredictionSet, b: PredictionSet, positive: int, n_bootstrap: int, seed: int
                 ) -> dict[str, dict[str, float | None]]:
    """Metric of A minus metric of B with a paired bootstrap CI (same resamples for both)."""
    values_a, values_b = compute_metrics(a, positive), compute_metrics(b, positive)
    intervals = (paired_bootstrap_difference(a, b, positive, n_resamples=n_bootstrap, seed=seed)
                 if n_bootstrap > 0 else {})
    differences = {}
    for name, metric_a in values_a.items():
        metric_b = values_b[name]
        defined = metric_a.value is not None and metric_b.value is not None
        interval = intervals.get(name, {})
        differences[name] = {"value": metric_a.value - metric_b.value if defined else None,
                             "ci_low": interval.get("ci_low") if defined else None,
                             "ci_high": interval.get("ci_high") if defined else None,
                             "undefined": None if defined else "undefined for at least one model"}
    return differences


def _grid_items(evaluation: Evaluation, size: int, seed: int) -> list[int]:
    """A reproducible sample of items, wrong predictions first so the grid shows failures."""
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(evaluation.predicted != evaluation.predictions.y_true)
    right = np.flatnonzero(evaluation.predicted == evaluation.predictions.y_true)
    picked = list(rng.permutation(wrong)[: size // 2])
    picked += list(rng.permutation(right)[: size - len(picked)])
    return sorted(int(i) for i in picked)


def prediction_grid(evaluation: Evaluation, path: Path, size: int = 16, seed: int = 0) -> Path | None:
    """Study D's grid of test images titled predicted vs true label; None when images cannot be shown
    (e.g. DICOM series or NIfTI volumes)."""
    predictions, names = evaluation.predictions, evaluation.predictions.class_names
    items = _grid_items(evaluation, size, seed)
    try:
        images = [read_image(predictions.paths[i]) for i in items]
    except (DataError, OSError, ValueError) as exc:
        logger.warning("prediction grid skipped: %s", exc)
        return None
    return plot_prediction_grid(images, [names[predictions.y_true[i]] for i in items],
                                [names[evaluation.predicted[i]] for i in items], path,
                                confidences=[float(predictions.proba[i].max()) for i in items])


def compare_runs(runs: list[str | Path], data: str | Path | None = None, split: str = "test",
                 metric: str = "f1", out_dir: str | Path | None = None, n_bootstrap: int = 1000,
                 label_map: dict[str, str] | None = None, external: bool = False, *,
                 positive_class: str | None = None, grid_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Evaluate ``runs`` on the same items and write ``comparison.{html,md,csv,json}`` plus one
    prediction grid per run into ``out_dir`` (default: ``comparisons/`` beside the first run)."""
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs")
    evaluations = [evaluate(run, data, split, None, label_map, n_bootstrap, external,
                            positive_class=positive_class, seed=seed, write=False) for run in runs]
    names = metric_names(evaluations[0].predictions.num_classes)
    if metric not in names:
        raise ValueError(f"--metric {metric!r} is not one of {list(names)}")
    orders = _aligned(evaluations)
    reference = evaluations[0]
    positive = reference.predictions.class_names.index(reference.payload["positive_class"])
    y_true = reference.predictions.y_true

    rows = []
    for evaluation in evaluations:
        rows.append({**_run_info(evaluation), "metrics": evaluation.payload["metrics"]})
    rows.sort(key=lambda row: -(row["metrics"][metric]["value"] if row["metrics"][metric]["value"] is not None
                                else -np.inf))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank

    out = Path(out_dir) if out_dir is not None else reference.loaded.run_dir.parent / "comparisons" / (
        f"{split}-" + "-vs-".join(e.loaded.run_dir.name for e in evaluations)[:120])
    out.mkdir(parents=True, exist_ok=True)
    aligned = [_reordered(e.predictions, order) for e, order in zip(evaluations, orders)]
    predicted = [e.predicted[order] for e, order in zip(evaluations, orders)]
    pairs = []
    for (i, a), (j, b) in combinations(enumerate(aligned), 2):
        tests = compare_predictions(y_true, predicted[i], predicted[j], positive, a.proba[:, positive],
                                    b.proba[:, positive])
        pairs.append({"a": evaluations[i].loaded.run_dir.name, "b": evaluations[j].loaded.run_dir.name,
                      "tests": [t.to_dict() for t in tests],
                      "differences": _differences(a, b, positive, n_bootstrap, seed)})
    grids = {}
    for evaluation in evaluations:
        name = evaluation.loaded.run_dir.name
        grid = prediction_grid(evaluation, out / f"grid-{name}.png", grid_size, seed)
        if grid is not None:
            grids[name] = grid.name

    payload = {"dataset": reference.payload["dataset"], "split": reference.payload["split"],
               "external": reference.payload["external"], "n_items": len(y_true),
               "positive_class": reference.payload["positive_class"], "ranked_by": metric, "metrics": list(names),
               "bootstrap": reference.payload["bootstrap"], "rows": rows, "pairs": pairs, "grids": grids}
    _write_csv(out / "comparison.csv", rows, names)
    context = {"c": payload, "labels": METRIC_LABELS, "out_dir": out}
    write_text(out / "comparison.html", render("comparison.html.j2", **context))
    write_text(out / "comparison.md", render("comparison.md.j2", **context))
    write_json(out / "comparison.json", payload)
    payload["out_dir"] = str(out)
    return payload


def _write_csv(path: Path, rows: list[dict[str, Any]], names: tuple[str, ...]) -> None:
    header = ["rank", "run", "model", "parameters", "runtime_seconds"]
    for name in names:
        header += [name, f"{name}_ci_low", f"{name}_ci_high"]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            line = [row["rank"], row["run"], row["model"], row["parameters"], row["runtime_seconds"]]
            for name in names:
                m = row["metrics"][name]
                line += [m["value"], m["ci_low"], m["ci_high"]]
            writer.writerow(["" if v is None else v for v in line])
    tmp.replace(path)

