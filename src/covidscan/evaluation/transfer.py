"""Does the model hold up elsewhere? One run evaluated on several sets, side by side, with a verdict.

:func:`evaluate_sets` evaluates a run on its own (in-source) split and on any number of external
sets, each with its own name and label map, writes every set's full evaluation under
``<run>/evaluation/<name>/`` and one combined report: a summary table (AUC with its CI, sensitivity
and specificity at the threshold chosen on the run's *own* validation split, the AUC drop from
in-source) and one section per set. The in-source and external rows have the same form and
prominence: an in-source AUC of 0.99 next to an external 0.54 is the finding, not a footnote.

The verdict rule (:func:`transfer_verdict`) is deliberately plain: an external AUC whose 95% CI
reaches chance (0.5), that is below :data:`NEAR_CHANCE`, or that falls by :data:`DROP_FAILS` or
more, "does not transfer"; a fall of :data:`DROP_PARTIAL` or more "transfers partly". An AUC whose CI
lies wholly below 0.5 (without a CI: at most 1 - :data:`NEAR_CHANCE`) is said to be worse than chance:
the model ranks that set's classes the wrong way round, a sign it learned a source-specific cue.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidscan.data.records import DataError
from covidscan.errors import UsageError
from covidscan.evaluation.evaluate import (
    EmptySplitError,
    Evaluation,
    UnknownSplitError,
    default_out_dir,
    evaluate,
    write_evaluation_files,
)
from covidscan.evaluation.metrics import METRIC_LABELS, MetricValue
from covidscan.evaluation.results import SetKind, TransferReport, TransferRow
from covidscan.runtime import write_json, write_text

logger = logging.getLogger(__name__)

DROP_FAILS = 0.10  # AUC points lost from in-source to external that mean "does not transfer"
DROP_PARTIAL = 0.05  # ... and that mean "transfers partly"
NEAR_CHANCE = 0.60  # an AUC below this is close to chance whatever its CI
SENSITIVITY_FALL = 0.20  # a sensitivity fall at the val-chosen threshold worth stating


@dataclass
class EvaluationSetSpec:
    """One set to evaluate a run on: a dataset (folder or manifest), its display/folder name and the
    label map that turns its labels into the model's classes."""

    data: str | Path
    name: str | None = None  # default: external-<dataset> (or <dataset>-<split> when not external)
    label_map: dict[str, str] = field(default_factory=dict)
    external: bool = True


def parse_set_spec(text: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH`` (the CLI form of a set) -> (name or None, path). A path that exists,
    or whose part before ``=`` looks like a path, is taken whole."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists() or "/" in name or "\\" in name or not name.strip() or not path.strip():
        return None, text
    return name.strip(), path.strip()


def split_label_maps(entries: Sequence[str], names: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """CLI label-map entries -> (entries for every set, ``{set name: its own entries}``): ``NAME:RAW=CLASS``
    applies to set NAME only (when NAME is one of ``names``), ``RAW=CLASS`` to all."""
    shared: list[str] = []
    scoped: dict[str, list[str]] = {name: [] for name in names}
    for entry in entries:
        prefix, sep, rest = entry.partition(":")
        if sep and prefix in scoped and "=" in rest:
            scoped[prefix].append(rest)
        else:
            shared.append(entry)
    return shared, scoped


def transfer_verdict(reference: MetricValue | None, external: MetricValue) -> str:
    """A plain-language verdict on an external ROC AUC, against the in-source one when known."""
    if external.value is None:
        return f"AUC undefined here ({external.undefined}); read sensitivity and specificity"
    chance = _chance(external)
    if reference is None or reference.value is None:
        return chance or "no in-source AUC to compare with"
    drop = reference.value - external.value
    if chance:
        return f"does not transfer: {chance}"
    if drop >= DROP_FAILS:
        return f"does not transfer: AUC {drop:.2f} below in-source"
    if drop >= DROP_PARTIAL:
        return f"transfers partly: AUC {drop:.2f} below in-source"
    return "transfers: AUC within 0.05 of in-source" if drop > 0 else "transfers: AUC at or above in-source"


def _chance(auc: MetricValue) -> str | None:
    """How an AUC is at or near chance, or None when it is not."""
    if auc.value is None:
        return None
    inverted = auc.ci_high < 0.5 if auc.ci_high is not None else auc.value <= 1 - NEAR_CHANCE
    if inverted:
        ci = ", 95% CI below 0.5" if auc.ci_high is not None else ""
        return f"worse than chance here (AUC {auc.value:.2f}{ci}): its ranking is inverted on this set"
    if auc.ci_low is not None and auc.ci_low <= 0.5:
        return f"no better than chance here (AUC {auc.value:.2f}, 95% CI reaches 0.5)"
    if auc.value < NEAR_CHANCE:
        return f"close to chance here (AUC {auc.value:.2f} < {NEAR_CHANCE:.2f})"
    return None


def _at_threshold(evaluation: Evaluation) -> tuple[MetricValue, MetricValue, float | None]:
    """Sensitivity and specificity at the val-chosen threshold (arg-max when there is none)."""
    report = evaluation.report
    if report.operating_point is not None:
        metrics = report.operating_point.metrics
        return metrics["sensitivity"], metrics["specificity"], report.operating_point.point.threshold
    return report.metrics["sensitivity"], report.metrics["specificity"], None


def _row(evaluation: Evaluation, reference: Evaluation | None) -> TransferRow:
    report = evaluation.report
    sensitivity, specificity, threshold = _at_threshold(evaluation)
    auc = report.metrics["roc_auc"]
    kind: SetKind = "in-source" if evaluation is reference else "external" if report.external else "given (--data)"
    if reference is None or evaluation is reference:
        verdict = transfer_verdict(None, auc)
        if evaluation is reference:
            chance = _chance(auc)
            verdict = "in-source reference" + (f" ({chance.replace(' here', '')})" if chance else "")
        drop = None
    else:
        reference_auc = reference.report.metrics["roc_auc"]
        verdict = transfer_verdict(reference_auc, auc)
        drop = reference_auc.value - auc.value if reference_auc.value is not None and auc.value is not None else None
        reference_sensitivity = _at_threshold(reference)[0].value
        if (
            reference_sensitivity is not None
            and sensitivity.value is not None
            and reference_sensitivity - sensitivity.value >= SENSITIVITY_FALL
        ):
            verdict += (
                f"; sensitivity at the val-chosen threshold falls from {reference_sensitivity:.2f} to "
                f"{sensitivity.value:.2f} (the threshold does not carry over)"
            )
    return TransferRow(
        name=evaluation.name,
        dataset=report.dataset,
        split=report.split,
        external=report.external,
        kind=kind,
        n_items=report.n_items,
        n_patients=report.n_patients,
        roc_auc=auc,
        sensitivity=sensitivity,
        specificity=specificity,
        threshold=threshold,
        auc_drop=drop,
        verdict=verdict,
        cam_lung=report.cam_lung,
    )


def evaluate_sets(
    run: str | Path,
    sets: Sequence[EvaluationSetSpec],
    split: str = "test",
    out_dir: str | Path | None = None,
    *,
    reference: bool = True,
    **options: Any,
) -> TransferReport:
    """Evaluate ``run`` on its own ``split`` (the in-source reference, when ``reference`` and the run
    has one) and on every set of ``sets``; write each set's full evaluation and the combined report.

    Without ``out_dir`` each set goes to ``<run>/evaluation/<name>/`` and the combined report to
    ``<run>/evaluation/summary/``; with it, sets go to ``out_dir/<name>/`` and the report to
    ``out_dir``. ``options`` are those of :func:`~covidscan.evaluation.evaluate.evaluate`
    (``n_bootstrap``, ``seed``, ``target_sensitivity``, ``grid_size``, ...).
    """
    if not sets and not reference:
        raise UsageError("nothing to evaluate: give at least one set or keep the in-source reference")
    _refuse_repeated([spec.name for spec in sets if spec.name])  # before any work; default names are checked below
    base = Path(out_dir) if out_dir is not None else None
    notes: list[str] = []
    evaluations: list[Evaluation] = []
    in_source = None
    if reference:
        try:
            in_source = evaluate(
                run, None, split, base / split if base else None, name=split, external=False, **options
            )
            evaluations.append(in_source)
        except EmptySplitError:
            notes.append(
                f"the run's splits.csv holds no {split!r} items, so there is no in-source reference: the "
                "external rows cannot be compared with the model's home performance"
            )
        except UnknownSplitError as error:  # a bare checkpoint or export: only the external sets
            notes.append(
                f"no in-source reference ({error}): the external rows cannot be compared with the model's home "
                "performance"
            )
    for spec in sets:
        evaluation = evaluate(
            run,
            spec.data,
            split,
            None,
            spec.label_map,
            external=spec.external,
            name=spec.name,
            write=False,
            **options,
        )
        evaluations.append(evaluation)
    _refuse_repeated([e.name for e in evaluations])
    for evaluation in evaluations[1 if in_source else 0 :]:
        # written once the names are known to be distinct, so no set overwrites another's files
        evaluation.out_dir = base / evaluation.name if base else default_out_dir(evaluation.predictor, evaluation.name)
        write_evaluation_files(evaluation, options.get("grid_size", 16), options.get("seed", 0))
    first = evaluations[0]
    rows = [_row(e, in_source) for e in evaluations]
    failing = [  # at chance, or far below in-source (the verdict says which)
        row.name
        for row in rows
        if row.external and (_chance(row.roc_auc) or row.verdict.startswith("does not transfer"))
    ]
    if failing:
        notes.append(fine_tune_advice(failing, first.report.run))
    summary = TransferReport(
        run=first.report.run or first.report.checkpoint,
        model=first.report.model,
        positive_class=first.report.positive_class,
        reference=in_source.name if in_source else None,
        rows=rows,
        notes=notes,
        out_dir=base if base else default_out_dir(first.predictor, "summary"),
    )
    write_transfer_report(summary, evaluations)
    return summary


def fine_tune_advice(failing: Sequence[str], run: str | None) -> str:
    """What to do where the model does not transfer: the remedy measured in benchmarks/local_finetune.py
    (the exact command when ``run`` is a training run directory, whose config and weights it reuses)."""
    if run and (Path(run) / "config.yaml").is_file() and (Path(run) / "checkpoints").is_dir():
        how = f"`covidscan train --config {run}/config.yaml --set data.source=SITE_DATA --set model.weights={run}`"
    else:
        how = "`--set model.weights=RUN` with the training run's directory"
    return (
        f"The model does not transfer to {', '.join(failing)}: do not use it there as it is. If that site can label "
        f"some of its own patients, fine-tune on them ({how}) and evaluate on other patients of that site; see "
        "docs/training.md, 'Starting from a trained run'."
    )


def _refuse_repeated(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"several evaluated sets are named {repeated}; give each its own name (NAME=PATH)")


def write_transfer_report(summary: TransferReport, evaluations: Sequence[Evaluation]) -> None:
    """``report.html`` (self-contained), ``report.md`` and ``summary.json`` of a multi-set evaluation."""
    from covidscan.evaluation.plots import plot_roc_overlay
    from covidscan.evaluation.report import render

    out = Path(summary.out_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    positive = evaluations[0].report.positive_index
    roc = plot_roc_overlay(
        {e.name: e.predictions for e in evaluations}, positive, out / "roc_by_set.png", summary.model
    )
    context = {
        "t": summary,
        "sets": evaluations,
        "roc": roc.name,
        "out_dir": out,
        "labels": METRIC_LABELS,
        "relative": lambda e: Path(os.path.relpath(e.out_dir, out)).as_posix(),
    }
    write_text(out / "report.html", render("transfer.html.j2", **context))
    write_text(out / "report.md", render("transfer.md.j2", **context))
    write_json(out / "summary.json", summary.to_dict())
    logger.info("multi-set report: %s", out / "report.html")
