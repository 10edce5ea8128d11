"""A study's paper-style tables: ``report.html`` + ``report.md`` + ``report.csv`` + ``report.json``.

Each table is one :func:`covidscan.evaluation.compare_runs` call over its rows (same items or
patients for every row, bootstrap 95% CIs, McNemar / Fisher / DeLong for every pair); a row shows
its metrics with CIs, the two-sided Fisher exact test against the first row (with stars), the
published numbers beside ours and, where the table asks, the run's figures (confusion matrix,
prediction grid and Grad-CAM maps from the evaluation and explain APIs, training curves). The
report opens with what the study is, what was substituted (data, backbones) and, for ``--quick``,
that its numbers only show that the protocol runs.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidscan.data import list_inputs
from covidscan.data.splits import load_splits
from covidscan.errors import UsageError
from covidscan.evaluation import evaluate_run
from covidscan.evaluation.compare import compare_runs
from covidscan.evaluation.metrics import METRIC_LABELS, MetricValue
from covidscan.evaluation.report import format_value, template_environment
from covidscan.evaluation.results import BootstrapInfo, Comparison
from covidscan.evaluation.stats import TestResult
from covidscan.runtime import atomic_path, write_json, write_text
from covidscan.studies.spec import RowSpec, TableSpec
from covidscan.training import phase_checkpoint_name

if TYPE_CHECKING:
    from covidscan.studies.runner import PlannedRun, RunOutcome, StudyContext

logger = logging.getLogger(__name__)

FISHER = "Fisher exact"


@dataclass
class StudyRow:
    """One row of a study table: which model, its metrics (95% CIs), the test against row 1."""

    key: str
    label: str
    run: str
    run_dir: str
    checkpoint: str | None  # None: the run's best.pt
    config: str  # the config file the run was trained from
    substitution: str | None  # e.g. "EfficientNet-Lite1 for ResNet50" for an offline variant
    columns: dict[str, str]
    metrics: dict[str, MetricValue]
    published: dict[str, float]
    fisher: TestResult | None  # against the first row; None for the first row itself
    runtime_seconds: float | None
    parameters: int
    figures: dict[str, list[str]] = field(default_factory=dict)  # kind -> paths relative to the report

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "run": self.run,
            "run_dir": self.run_dir,
            "checkpoint": self.checkpoint,
            "config": self.config,
            "substitution": self.substitution,
            "columns": self.columns,
            "metrics": {name: metric.to_dict() for name, metric in self.metrics.items()},
            "published": self.published,
            "fisher_vs_first": self.fisher.to_dict() if self.fisher is not None else None,
            "runtime_seconds": self.runtime_seconds,
            "parameters": self.parameters,
            "figures": self.figures,
        }


@dataclass
class StudyTable:
    """One paper table, scored on ``split`` at ``level`` (item or patient) over ``n_compared`` units."""

    id: str
    title: str
    split: str
    level: str
    n_compared: int
    metrics: list[str]
    columns: list[str]
    runtime: bool
    bootstrap: BootstrapInfo
    rows: list[StudyRow]
    notes: list[str]
    comparison_dir: str

    @property
    def has_published(self) -> dict[str, bool]:
        return {name: any(name in row.published for row in self.rows) for name in self.metrics}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "split": self.split,
            "level": self.level,
            "n_compared": self.n_compared,
            "metrics": self.metrics,
            "columns": self.columns,
            "bootstrap": self.bootstrap.to_dict(),
            "rows": [row.to_dict() for row in self.rows],
            "notes": self.notes,
            "comparison_dir": self.comparison_dir,
        }


@dataclass
class StudyReport:
    """What ``covidscan study run`` produced; ``to_dict()`` is ``report.json``."""

    name: str
    title: str
    summary: str
    study_file: str
    out_dir: Path
    quick: str | None  # what --quick reduced, or None for the full protocol
    substitutions: list[str]
    published_source: str | None
    tables: list[StudyTable]
    runs: list[RunOutcome]
    sweep: dict[str, Any] | None
    submission: dict[str, Any] | None
    notes: list[str]

    def table(self, table_id: str) -> StudyTable:
        return next(table for table in self.tables if table.id == table_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "summary": self.summary,
            "study_file": self.study_file,
            "quick": self.quick,
            "substitutions": self.substitutions,
            "published_source": self.published_source,
            "tables": [table.to_dict() for table in self.tables],
            "runs": [outcome.to_dict() for outcome in self.runs],
            "sweep": self.sweep,
            "submission": self.submission,
            "notes": self.notes,
        }


_SUBSTITUTION = re.compile(r"BACKBONE SUBSTITUTION:\s*(.+?\bfor\b\s+\S+?)[,;.]", re.DOTALL)


def backbone_substitution(config_file: Path) -> str | None:
    """``"EfficientNet-Lite1 for ResNet50"`` from an offline variant's header, else None."""
    header = "".join(line.lstrip("# ") + " " for line in config_file.read_text().splitlines() if line.startswith("#"))
    match = _SUBSTITUTION.search(header)
    return " ".join(match.group(1).split()) if match else None


def _config_value(run: PlannedRun, dotted: str) -> str:
    node: Any = run.config.to_dict()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UsageError(f"table column {dotted!r}: no such config key in run {run.id}")
        node = node[part]
    return str(node)


def _table_rows(context: StudyContext, table: TableSpec) -> tuple[list[RowSpec], list[str]]:
    """The table's rows in order (globs expanded over the run ids); rows whose run did not run
    (a quick grid's subset, a sweep without a finished trial) are left out with a note."""
    rows, notes, missing = [], [], []
    for entry in table.rows:
        spec = RowSpec(entry) if isinstance(entry, str) else entry
        matches = [run_id for run_id in context.runs if fnmatch.fnmatchcase(run_id, spec.run)]
        if not matches:
            missing.append(spec.run)
        for run_id in matches:
            rows.append(
                RowSpec(run_id, spec.label, spec.checkpoint, dict(spec.published)) if run_id != spec.run else spec
            )
    if missing:
        notes.append(f"rows not run in this call, left out: {', '.join(missing)}")
    return rows, notes


def _source(run: PlannedRun, row: RowSpec) -> Path:
    """What the row scores: the run (its best checkpoint) or one of its per-phase checkpoints."""
    if row.checkpoint is None:
        return run.run_dir
    path = run.run_dir / "checkpoints" / phase_checkpoint_name(int(row.checkpoint.split("-")[1]))
    if not path.is_file():
        raise UsageError(
            f"{path} does not exist: run {run.id} was trained without per-phase checkpoints (or its phase "
            f"{row.checkpoint[6:]} never saved a best checkpoint); delete {run.run_dir} to train it again"
        )
    return path


def _gradcam_items(run_dir: Path, split: str, count: int) -> list[str]:
    """The first ``count`` items of ``split``, taken from each class in turn (sorted by path)."""
    by_class: dict[str, list[str]] = {}
    for sample in load_splits(run_dir / "splits.csv").samples:
        if sample.split == split:
            by_class.setdefault(sample.label or "", []).append(sample.path)
    queues = [sorted(paths) for _, paths in sorted(by_class.items())]
    picked: list[str] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def _row_figures(
    context: StudyContext, table: TableSpec, run: PlannedRun, row: RowSpec, source: Path
) -> dict[str, list[str]]:
    """The figures ``table.figures`` asks for, as paths relative to the study directory."""
    figures: dict[str, list[str]] = {}
    folder = context.out_dir / "tables" / table.id / row.key.replace("@", "-")
    if {"confusion", "grid"} & set(table.figures):
        report = evaluate_run(
            source,
            split=table.split,
            out_dir=folder / "evaluation",
            n_bootstrap=context.bootstrap,
            grid_size=16 if "grid" in table.figures else 0,
        )
        written = report.figures or {}
        for kind, name in (("confusion", "confusion_matrix"), ("grid", "prediction_grid")):
            if kind in table.figures and name in written:
                figures[kind] = [str((folder / "evaluation" / written[name]).relative_to(context.out_dir))]
    if "gradcam" in table.figures:
        from covidscan.explain import explain_files
        from covidscan.inference import load_predictor

        spec = context.spec.gradcam
        items = _gradcam_items(run.run_dir, table.split, spec.images)
        out = folder / "gradcam"
        _, failures = explain_files(load_predictor(source), items, out, spec.method, progress=False)
        for path, error in failures.items():
            logger.warning("Grad-CAM skipped %s: %s", path, error)
        figures["gradcam"] = sorted(str(p.relative_to(context.out_dir)) for p in out.glob("*.png"))
    if "history" in table.figures:
        plots = sorted((run.run_dir / "plots").glob("*.png"))
        figures["history"] = [str(p.relative_to(context.out_dir)) for p in plots if p.is_relative_to(context.out_dir)]
    return figures


def build_table(context: StudyContext, table: TableSpec) -> StudyTable | None:
    """Score one table's rows with ``compare_runs`` and lay them out; None (with a note) when fewer
    than two of its rows ran."""
    rows, notes = _table_rows(context, table)
    if len(rows) < 2:
        context.notes.append(f"table {table.id} skipped: fewer than two of its rows ran")
        return None
    sources = [_source(context.runs[row.run], row) for row in rows]
    out = context.out_dir / "tables" / table.id
    comparison: Comparison = compare_runs(
        [str(s) for s in sources],
        split=table.split,
        metric=table.metrics[0],
        out_dir=out / "comparison",
        n_bootstrap=context.bootstrap,
        level=table.level,
        row_names=[row.key for row in rows],
        grid_size=0,
    )
    by_name = {row.run: row for row in comparison.rows}
    first = rows[0].key
    fisher = {
        pair.b: next((t for t in pair.tests if t.test == FISHER), None) for pair in comparison.pairs if pair.a == first
    }
    table_rows = []
    for row, source in zip(rows, sources):
        run, scored = context.runs[row.run], by_name[row.key]
        offline = run.variant == "offline"
        table_rows.append(
            StudyRow(
                key=row.key,
                label=row.label or run.label,
                run=run.id,
                run_dir=str(run.run_dir),
                checkpoint=row.checkpoint,
                config=str(run.config_file),
                substitution=backbone_substitution(run.config_file) if offline else None,
                columns={header: _config_value(run, key) for header, key in table.columns.items()},
                metrics={name: scored.metrics[name] for name in table.metrics},
                published=dict(row.published),
                fisher=fisher.get(row.key),
                runtime_seconds=scored.runtime_seconds,
                parameters=scored.parameters,
                figures=_row_figures(context, table, run, row, source),
            )
        )
    if table.note:
        notes.insert(0, " ".join(table.note.split()))
    notes += comparison.notes
    if comparison.level == "patient":
        notes.append(
            "scored per patient: each run's probabilities averaged over a patient's items "
            f"({comparison.n_compared} patients)"
        )
    return StudyTable(
        id=table.id,
        title=table.title,
        split=comparison.split,
        level=comparison.level,
        n_compared=comparison.n_compared,
        metrics=list(table.metrics),
        columns=list(table.columns),
        runtime=table.runtime,
        bootstrap=comparison.bootstrap,
        rows=table_rows,
        notes=notes,
        comparison_dir=str((out / "comparison").relative_to(context.out_dir)),
    )


def write_submission(context: StudyContext, tables: list[StudyTable], unlabeled: Path | None) -> dict[str, Any] | None:
    """Study A's submission file: the table's best row (by ``metric``) predicts the unlabeled folder."""
    from covidscan.inference import load_predictor
    from covidscan.serving import predict_files

    spec = context.spec.submission
    if spec is None:
        return None
    folder = unlabeled or context.spec.resolve(spec.input)
    if not folder.is_dir():
        context.notes.append(f"no submission file: the unlabeled folder {folder} does not exist (pass --unlabeled DIR)")
        return None
    table = next((t for t in tables if t.id == spec.table), None)
    if table is None:
        return None
    scored = [row for row in table.rows if row.metrics[spec.metric].value is not None]
    if not scored:
        context.notes.append(f"no submission file: no row of {table.id} has a defined {spec.metric}")
        return None
    best = max(scored, key=lambda row: row.metrics[spec.metric].value or 0.0)
    files = list_inputs([folder])
    if context.quick:
        files = files[: spec.quick_images]
    row_spec = RowSpec(best.run, checkpoint=best.checkpoint)
    predictor = load_predictor(_source(context.runs[best.run], row_spec))
    out = context.out_dir / f"submission-{best.key.replace('@', '-')}.csv"
    summary = predict_files(predictor, files, out, progress=False)
    return {
        "file": out.name,
        "model": best.label,
        "run": best.run,
        "chosen_by": f"highest {METRIC_LABELS[spec.metric]} in {table.id} "
        f"({format_value(best.metrics[spec.metric].value)})",
        "input": str(folder),
        "files": len(files),
        "predicted": summary.predicted + summary.skipped,
        "failed": summary.failed,
    }


def _write_csv(path: Path, report: StudyReport) -> None:
    """One line per table row: its columns, each metric with CI and published value, the test."""
    header = ["table", "row", "label", "run_dir", "checkpoint", "config", "substitution", "split", "level"]
    lines = []
    for table in report.tables:
        for row in table.rows:
            line: dict[str, Any] = {
                "table": table.id,
                "row": row.key,
                "label": row.label,
                "run_dir": row.run_dir,
                "checkpoint": row.checkpoint or "best",
                "config": row.config,
                "substitution": row.substitution or "",
                "split": table.split,
                "level": table.level,
                **row.columns,
                "fisher_p_vs_first": row.fisher.p_value if row.fisher else "",
                "fisher_stars": row.fisher.stars if row.fisher else "",
                "runtime_seconds": row.runtime_seconds,
                "parameters": row.parameters,
            }
            for name, metric in row.metrics.items():
                line.update(
                    {
                        name: metric.value,
                        f"{name}_ci_low": metric.ci_low,
                        f"{name}_ci_high": metric.ci_high,
                        f"{name}_published": row.published.get(name, ""),
                    }
                )
            lines.append(line)
            header += [key for key in line if key not in header]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in line.items()} for line in lines])


def write_report(report: StudyReport) -> None:
    """``report.{html,md,csv,json}`` in the study directory."""
    out = report.out_dir
    env = template_environment("covidscan.studies")
    context = {"s": report, "out_dir": out}
    write_text(out / "report.html", env.get_template("study.html.j2").render(**context))
    write_text(out / "report.md", env.get_template("study.md.j2").render(**context))
    _write_csv(out / "report.csv", report)
    write_json(out / "report.json", report.to_dict())


def build_report(context: StudyContext, unlabeled: Path | None = None) -> StudyReport:
    """Every table of the study, the submission file, and the report files."""
    spec = context.spec
    tables = [t for t in (build_table(context, table) for table in spec.tables) if t is not None]
    submission = write_submission(context, tables, unlabeled)
    quick = None
    if context.quick:
        q = spec.quick
        quick = (
            f"QUICK SMOKE RUN: at most {q.max_per_class} images (or scans) per class, {q.image_size}x{q.image_size} "
            f"input, {q.epochs} epoch(s) per phase, {q.bootstrap} bootstrap resamples"
            + (f", grid subset {q.grid}" if q.grid else "")
            + ". Its numbers only show that the protocol runs end to end; they say nothing about the models."
        )
    report = StudyReport(
        name=spec.name,
        title=spec.title,
        summary=" ".join(spec.summary.split()),
        study_file=spec.path,
        out_dir=context.out_dir,
        quick=quick,
        substitutions=list(spec.substitutions),
        published_source=spec.published_source,
        tables=tables,
        runs=list(context.outcomes),
        sweep=context.sweep,
        submission=submission,
        notes=list(context.notes),
    )
    write_report(report)
    return report
