"""Leave-one-source-out cross-validation: does a model trained on some hospitals work at another?

For a config whose ``data.source`` lists several named sources, :func:`cross_validate` trains one
fold per source: the fold holds that source out, trains on the others (with their own train/val/test
split, as the config says) and evaluates on every training source's test part (*in-source*) and on
the held-out source in full (*out-of-source*). Each fold is an ordinary run directory, made by the
public trainer (:func:`covidscan.training.train`) with the held-out source as ``data.test_source``,
and evaluated once, by the trainer's own test evaluation run with crossval's options. Its per-source
metrics fill one row of the train-sources x test-source matrix: ROC AUC, and sensitivity /
specificity at the threshold chosen on the fold's own validation split, each with its bootstrap 95% CI.

The headline is the gap between the mean in-source AUC and the mean out-of-source AUC: a model that
learned the disease keeps it small; one that learned its sources (scanner, protocol, borders)
does not. Resumable like sweeps: a finished fold (``crossval.json`` in its folder) is read back,
an interrupted one resumes from its ``checkpoints/last.pt``.

It orchestrates runs, as the sweep does, so it lives in ``covidscan.tracking``, above both
training and evaluation (evaluation never imports training).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covidscan.config import ConfigError, RunConfig, load_config
from covidscan.data.sources import load_samples, select_sources
from covidscan.evaluation.evaluate import evaluate_run
from covidscan.evaluation.metrics import METRIC_LABELS, MetricValue
from covidscan.evaluation.results import EvaluationReport
from covidscan.evaluation.transfer import transfer_verdict
from covidscan.runtime import write_json, write_text
from covidscan.tracking.callbacks import flatten
from covidscan.training import Callback, train

logger = logging.getLogger(__name__)

RESULT_FILE = "crossval.json"  # a fold's cells; its presence marks the fold finished
SHOWN = ("roc_auc", "sensitivity", "specificity")


def _metric(raw: dict[str, Any]) -> MetricValue:
    return MetricValue(raw["value"], raw.get("undefined"), raw.get("ci_low"), raw.get("ci_high"))


@dataclass
class CrossValCell:
    """One test source as seen by one fold: its test part (in-source) or all of it (held out)."""

    source: str
    in_source: bool
    n_items: int
    roc_auc: MetricValue
    sensitivity: MetricValue  # at the fold's val-chosen threshold (arg-max without one)
    specificity: MetricValue

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "in_source": self.in_source,
            "n_items": self.n_items,
            **{name: getattr(self, name).to_dict() for name in SHOWN},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CrossValCell:
        return cls(raw["source"], raw["in_source"], raw["n_items"], *(_metric(raw[name]) for name in SHOWN))


@dataclass
class CrossValFold:
    """One trained fold: the source held out, the sources trained on, and its row of cells."""

    held_out: str
    train_sources: list[str]
    run_dir: str
    threshold: float | None  # chosen on the fold's own val split
    cells: dict[str, CrossValCell]

    @property
    def out_of_source(self) -> CrossValCell | None:
        return self.cells.get(self.held_out)

    def in_source_auc(self) -> float | None:
        """Mean AUC over the fold's training sources' test parts (where defined)."""
        return _mean([c.roc_auc.value for c in self.cells.values() if c.in_source])

    def verdict(self) -> str:
        cell = self.out_of_source
        if cell is None:
            return "held-out source not evaluated"
        home = self.in_source_auc()
        return transfer_verdict(MetricValue(home) if home is not None else None, cell.roc_auc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "held_out": self.held_out,
            "train_sources": self.train_sources,
            "run_dir": self.run_dir,
            "threshold": self.threshold,
            "cells": {name: cell.to_dict() for name, cell in self.cells.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CrossValFold:
        cells = {name: CrossValCell.from_dict(cell) for name, cell in raw["cells"].items()}
        return cls(raw["held_out"], list(raw["train_sources"]), raw["run_dir"], raw["threshold"], cells)


@dataclass
class CrossValReport:
    """The matrix (one fold per held-out source), the in-source vs out-of-source gap and where it is."""

    name: str
    sources: list[str]
    folds: list[CrossValFold]
    out_dir: Path
    figure: str | None = None
    notes: list[str] = field(default_factory=list)

    def cell(self, held_out: str, source: str) -> CrossValCell | None:
        return next((f.cells.get(source) for f in self.folds if f.held_out == held_out), None)

    @property
    def in_source_auc(self) -> float | None:
        """Mean AUC over every in-source cell (training sources' test parts)."""
        return _mean([c.roc_auc.value for f in self.folds for c in f.cells.values() if c.in_source])

    @property
    def out_of_source_auc(self) -> float | None:
        """Mean AUC over the held-out sources."""
        return _mean([f.out_of_source.roc_auc.value for f in self.folds if f.out_of_source is not None])

    @property
    def gap(self) -> float | None:
        """Mean in-source AUC minus mean out-of-source AUC."""
        inside, outside = self.in_source_auc, self.out_of_source_auc
        return inside - outside if inside is not None and outside is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sources": self.sources,
            "in_source_auc": self.in_source_auc,
            "out_of_source_auc": self.out_of_source_auc,
            "gap": self.gap,
            "folds": [{**fold.to_dict(), "verdict": fold.verdict()} for fold in self.folds],
            "figure": self.figure,
            "notes": self.notes,
        }


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(defined)) if defined else None


def _cells(report: EvaluationReport, held_out: str) -> dict[str, CrossValCell]:
    """The fold's test split, one cell per source (``per_source``; the pooled metrics when the split
    holds one source only: the held-out one, which is always in it)."""
    parts: dict[str, tuple[int, dict[str, MetricValue], dict[str, MetricValue] | None]] = {
        name: (part.n_items, part.metrics, part.at_threshold) for name, part in report.per_source.items()
    }
    if not parts:
        at_threshold = report.operating_point.metrics if report.operating_point else None
        parts[held_out] = (report.n_items, report.metrics, at_threshold)
    cells = {}
    for name, (n_items, metrics, at_threshold) in parts.items():
        chosen = at_threshold or metrics
        cells[name] = CrossValCell(
            name, name != held_out, n_items, metrics["roc_auc"], chosen["sensitivity"], chosen["specificity"]
        )
    return cells


def _fold(
    config: RunConfig,
    sources: list[str],
    held_out: str,
    fold_dir: Path,
    callbacks: Sequence[Callback],
    **options: Any,
) -> CrossValFold:
    """Train (or resume) one fold and evaluate it; a finished fold is read back from its folder."""
    result_file = fold_dir / RESULT_FILE
    if result_file.is_file():
        logger.info("crossval: fold without %s already done (%s)", held_out, fold_dir)
        return CrossValFold.from_dict(json.loads(result_file.read_text(encoding="utf-8")))
    train_sources = [s for s in sources if s != held_out]
    fold_config = select_sources(config, train_sources, test=[held_out])
    fold_config.name = f"{config.name}-without-{held_out}"
    report = None
    if not (fold_dir / "metrics.json").is_file():  # the trainer writes it last: training finished
        resume = (fold_dir / "checkpoints" / "last.pt").is_file()
        logger.info("crossval: %s fold without %s in %s", "resuming" if resume else "training", held_out, fold_dir)
        # the trainer's own test evaluation, with crossval's options: the fold's test split is evaluated once
        report = train(fold_config, fold_dir, callbacks, resume, evaluate_options=options).test_metrics
    if report is None:  # trained before an interruption: evaluate the finished fold now
        report = evaluate_run(fold_dir, split="test", **options)
    threshold = report.operating_point.point.threshold if report.operating_point else None
    fold = CrossValFold(held_out, train_sources, str(fold_dir), threshold, _cells(report, held_out))
    write_json(result_file, fold.to_dict())
    return fold


def cross_validate(
    config: RunConfig,
    out_dir: str | Path | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    n_bootstrap: int = 1000,
    seed: int = 0,
    **options: Any,
) -> CrossValReport:
    """Leave-one-source-out over ``config.data.source`` (two or more named sources): one fold per
    source, written to ``out_dir/holdout-<source>/`` (default ``<output_dir>/crossval/<name>/``),
    then ``report.html``, ``report.md``, ``crossval.json`` and ``auc_matrix.png`` in ``out_dir``.
    Running it again skips finished folds and resumes an interrupted one. ``options`` go to
    :func:`~covidscan.evaluation.evaluate.evaluate` (``target_sensitivity``, ``aggregation``, ...)."""
    sources = [source.name for source in config.data.sources]
    if len(sources) < 2:
        raise ConfigError(
            f"crossval needs two or more sources in data.source (got {sources}); list them, e.g. "
            "data.source: [{name: a, path: DIR_A}, {name: b, path: DIR_B}]"
        )
    if config.data.test_source:
        raise ConfigError(
            "crossval holds each data.source out in turn as the test source; remove data.test_source "
            "(evaluate a fold run on other sets with `covidscan evaluate --external`)"
        )
    _check_folds_can_split(config, sources)
    out = Path(out_dir) if out_dir is not None else Path(config.output_dir) / "crossval" / config.name
    out.mkdir(parents=True, exist_ok=True)
    _check_same_experiment(config, out / "config.yaml")
    config.save(out / "config.yaml")
    folds = [
        _fold(
            config,
            sources,
            held_out,
            out / f"holdout-{held_out}",
            callbacks,
            n_bootstrap=n_bootstrap,
            seed=seed,
            **options,
        )
        for held_out in sources
    ]
    report = CrossValReport(config.name, sources, folds, out)
    missing = [f.held_out for f in folds if not any(c.in_source for c in f.cells.values())]
    if missing:
        report.notes.append(
            f"folds without {missing} have no in-source test items (data.split gives no test share?): their "
            "rows show the held-out source only"
        )
    write_crossval_report(report)
    return report


def _check_folds_can_split(config: RunConfig, sources: list[str]) -> None:
    """A grouped split needs patient ids in every fold's training sources: say which fold has none
    before any fold trains (not after the first hours of training)."""
    if config.data.split.method != "grouped":
        return
    loaded = load_samples(config.data.source, label_map=config.data.label_map, require_labels=False, check_files="none")
    with_ids = {s.source for s in loaded.samples if s.patient_id}
    for held_out in sources:
        train_sources = [s for s in sources if s != held_out]
        if not with_ids.intersection(train_sources):
            raise ConfigError(
                f"data.split.method 'grouped': the fold without {held_out} trains on {', '.join(train_sources)}, "
                "where no sample has a patient id, so it cannot be split by patient; use data.split.method: auto "
                "(grouped where patient ids exist, stratified otherwise)"
            )


def _check_same_experiment(config: RunConfig, saved_file: Path) -> None:
    """Refuse to mix folds of two configs: finished folds in ``out_dir`` are read back, not redone."""
    if not saved_file.is_file():
        return
    before, after = flatten(load_config(saved_file).to_dict()), flatten(config.to_dict())
    changed = sorted(
        key for key in before.keys() | after.keys() if key != "output_dir" and before.get(key) != after.get(key)
    )
    if changed:
        raise ConfigError(
            f"{saved_file.parent}: holds a cross-validation of another config (it differs in {', '.join(changed)}); "
            "its finished folds would be mixed with new ones. Choose another --out, or remove that folder to start over"
        )


def write_crossval_report(report: CrossValReport) -> None:
    """The heat-map, ``report.html`` (self-contained), ``report.md`` and ``crossval.json``."""
    from covidscan.evaluation.plots import plot_source_matrix
    from covidscan.evaluation.report import render

    out = report.out_dir
    auc = [[_value(report.cell(f.held_out, s), "roc_auc") for s in report.sources] for f in report.folds]
    low = [[_value(report.cell(f.held_out, s), "roc_auc", "ci_low") for s in report.sources] for f in report.folds]
    high = [[_value(report.cell(f.held_out, s), "roc_auc", "ci_high") for s in report.sources] for f in report.folds]
    figure = plot_source_matrix(
        np.array(auc, dtype=float),
        np.array(low, dtype=float),
        np.array(high, dtype=float),
        [f"train: {', '.join(f.train_sources)}" for f in report.folds],
        report.sources,
        [report.sources.index(f.held_out) for f in report.folds],
        out / "auc_matrix.png",
        title=f"{report.name}: ROC AUC, leave one source out",
    )
    report.figure = figure.name
    context = {"x": report, "labels": METRIC_LABELS, "shown": SHOWN, "out_dir": out}
    write_text(out / "report.html", render("crossval.html.j2", **context))
    write_text(out / "report.md", render("crossval.md.j2", **context))
    write_json(out / "crossval.json", report.to_dict())


def _value(cell: CrossValCell | None, metric: str, part: str = "value") -> float:
    if cell is None:
        return math.nan
    value = getattr(getattr(cell, metric), part)
    return math.nan if value is None else value
