"""Past runs from their directories alone (no tracking server): ``covidscan runs list/show``.

A run directory is any folder holding a ``config.yaml`` (see docs/architecture.md). Crashed,
interrupted or still-running runs are listed too, with a status saying how far they got.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from covidscan.data.records import DataError
from covidscan.errors import UsageError
from covidscan.tracking.callbacks import flatten

# The headline test metrics: binary name first, then the multi-class equivalent.
_TEST_METRICS = {"test_accuracy": ("accuracy",), "test_f1": ("f1", "macro_f1"), "test_auc": ("roc_auc", "macro_auroc")}
_SKIPPED_FOLDERS = {"checkpoints", "plots", "evaluation", "tensorboard", "mlartifacts"}
FORMATS = ("table", "csv", "json")


@dataclass
class RunSummary:
    """One row of ``covidscan runs list``; metrics are None when the run did not produce them."""

    path: str
    name: str
    date: str | None  # ISO start time; None when the run records none (undated runs sort last)
    status: str  # complete | incomplete (crashed, interrupted, pruned or running) | not started | unreadable
    model: str | None = None
    dataset: str | None = None
    epochs: int = 0
    planned_epochs: int | None = None
    monitor: str | None = None
    best: float | None = None
    best_epoch: int | None = None
    test_accuracy: float | None = None
    test_f1: float | None = None
    test_auc: float | None = None
    runtime_seconds: float | None = None


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise DataError(f"{path} holds no mapping")
    return data


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_history_rows(run_dir: Path) -> list[dict[str, float]]:
    """``history.csv`` as numbers (empty when absent or cut short mid-row)."""
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                rows.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items() if k})
            except ValueError:
                break
    return rows


def _metric_value(numbers: list[tuple[list[str], float]], name: str) -> float | None:
    """The least nested number stored under ``name`` (``name`` itself or ``name.value``)."""
    matches = [
        (len(parts), value)
        for parts, value in numbers
        if "per_class" not in parts and (parts[-1] == name or parts[-2:] == [name, "value"])
    ]
    return float(min(matches)[1]) if matches else None


def headline_test_metrics(test: Any) -> dict[str, float | None]:
    """Accuracy, F1 and AUC out of an evaluation result, whatever its nesting
    (``{"accuracy": 0.9}``, ``{"metrics": {"accuracy": {"value": 0.9, "ci_low": ...}}}``)."""
    numbers = (
        [
            (key.split("."), value)
            for key, value in flatten(test).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        if isinstance(test, dict)
        else []
    )
    found: dict[str, float | None] = {}
    for column, names in _TEST_METRICS.items():
        values = (_metric_value(numbers, name) for name in names)
        found[column] = next((value for value in values if value is not None), None)
    return found


def _dataset_label(source: Any) -> str | None:
    if not isinstance(source, str):
        return None
    path = Path(source)
    return f"{path.parent.name}/{path.name}" if path.suffix else path.name


def _best_from_history(rows: list[dict[str, float]], monitor: str, mode: str) -> tuple[float | None, int | None]:
    scored = [
        (row[monitor], int(row.get("epoch", i + 1)))
        for i, row in enumerate(rows)
        if monitor in row and math.isfinite(row[monitor])
    ]
    if not scored:
        return None, None
    value, epoch = (min if mode == "min" else max)(scored, key=lambda item: item[0])
    return value, epoch


_NAME_STAMP = re.compile(r"-(\d{8}-\d{6})(?:-\d+)?$")  # create_run_dir's <name>-YYYYmmdd-HHMMSS[-n]


def _run_date(run_dir: Path, environment: Any) -> str | None:
    """When the run started: ``environment.json``'s ``time_utc``, else the timestamp ``create_run_dir``
    put in the folder name (local time, no zone), else None ("undated": listed last, shown as "-").

    File modification times are deliberately not used: copying or touching a run would re-date it.
    """
    if isinstance(environment, dict) and environment.get("time_utc"):
        return str(environment["time_utc"])
    match = _NAME_STAMP.search(run_dir.name)
    if match:
        try:
            return datetime.strptime(match.group(1), "%Y%m%d-%H%M%S").isoformat()
        except ValueError:
            return None
    return None


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Everything ``runs list`` shows about one run directory; never raises on a broken run."""
    run_dir = Path(run_dir)
    environment = None
    with contextlib.suppress(OSError, ValueError):
        environment = _read_json(run_dir / "environment.json")
    summary = RunSummary(
        path=str(run_dir), name=run_dir.name, date=_run_date(run_dir, environment), status="unreadable"
    )
    try:
        config = _read_yaml(run_dir / "config.yaml")
        metrics = _read_json(run_dir / "metrics.json")
    except (OSError, ValueError, yaml.YAMLError):
        return summary
    history = read_history_rows(run_dir)
    training = config.get("training") or {}
    summary.model = (config.get("model") or {}).get("name")
    summary.dataset = _dataset_label((config.get("data") or {}).get("source"))
    summary.epochs = len(history)
    summary.planned_epochs = (
        sum(int(p.get("epochs", 0)) for p in training.get("phases") or [] if isinstance(p, dict)) or None
    )
    summary.monitor = training.get("checkpoint_monitor")
    if isinstance(metrics, dict):
        summary.status = "complete"
        summary.monitor = metrics.get("monitor", summary.monitor)
        best_row = metrics.get("best") or {}
        summary.best = best_row.get(summary.monitor) if isinstance(best_row, dict) else None
        summary.best_epoch = metrics.get("best_epoch")
        summary.epochs = int(metrics.get("epochs_trained", summary.epochs))
        summary.runtime_seconds = metrics.get("runtime_seconds")
        for key, value in headline_test_metrics(metrics.get("test")).items():
            setattr(summary, key, value)
    else:
        summary.status = "incomplete" if history else "not started"
        if summary.monitor:
            summary.best, summary.best_epoch = _best_from_history(
                history, summary.monitor, training.get("checkpoint_mode", "min")
            )
        seconds = [row["seconds"] for row in history if math.isfinite(row.get("seconds", math.nan))]
        summary.runtime_seconds = sum(seconds) if seconds else None
    return summary


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every folder under ``root`` (or ``root`` itself) holding a ``config.yaml``; a run's own
    sub-folders are not searched, a sweep's folder of trial runs is."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: runs folder not found")
    found = []
    for folder, subfolders, files in os.walk(root):
        if "config.yaml" in files:
            found.append(Path(folder))
            subfolders[:] = []
        else:
            subfolders[:] = sorted(
                name for name in subfolders if name not in _SKIPPED_FOLDERS and not name.startswith(".")
            )
    return found


def list_runs(root: str | Path = "runs", sort: str | None = None, ascending: bool = False) -> list[RunSummary]:
    """Summaries of all runs under ``root``, newest first or sorted by a column (missing values last)."""
    runs = [summarize_run(path) for path in find_run_dirs(root)]
    key = sort or "date"
    columns = RunSummary.__dataclass_fields__
    if key not in columns:
        raise UsageError(f"--sort {key!r} is not a column; choose from {list(columns)}")
    present = [run for run in runs if getattr(run, key) is not None]
    missing = [run for run in runs if getattr(run, key) is None]
    present.sort(key=lambda run: getattr(run, key), reverse=not ascending if sort else True)
    return present + missing


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


_TABLE_COLUMNS = (
    "name",
    "date",
    "status",
    "model",
    "dataset",
    "epochs",
    "monitor",
    "best",
    "test_accuracy",
    "test_f1",
    "test_auc",
    "runtime_seconds",
)


def _table_cell(run: RunSummary, column: str) -> str:
    if column == "date":
        return run.date[:16].replace("T", " ") if run.date else "-"
    if column == "runtime_seconds" and run.runtime_seconds is not None:
        return f"{run.runtime_seconds:.0f}" if run.runtime_seconds >= 10 else f"{run.runtime_seconds:.1f}"
    return _cell(getattr(run, column))


def format_runs(runs: list[RunSummary], fmt: Literal["table", "csv", "json"] = "table") -> str:
    """Render summaries as an aligned text table, CSV (all columns) or JSON."""
    if fmt == "json":
        return json.dumps([asdict(run) for run in runs], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(RunSummary.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(run) for run in runs)
        return buffer.getvalue()
    if fmt != "table":
        raise UsageError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if not runs:
        return "no runs found"
    headers = [c.replace("test_", "test ").replace("runtime_seconds", "runtime s") for c in _TABLE_COLUMNS]
    cells = [[_table_cell(run, column) for column in _TABLE_COLUMNS] for run in runs]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _metric_lines(test: Any, prefix: str = "") -> list[str]:
    """``name  value [ci_low, ci_high]`` for every ``{"value": ...}`` node of an evaluation result."""
    if not isinstance(test, dict):
        return []
    if "value" in test and not isinstance(test["value"], dict):
        line = f"  {prefix:<28} {_cell(test['value'])}"
        if test.get("ci_low") is not None and test.get("ci_high") is not None:
            line += f"  [{test['ci_low']:.4f}, {test['ci_high']:.4f}] 95% CI"
        elif test.get("undefined"):
            line += f"  ({test['undefined']})"
        return [line]
    lines = []
    for key, value in test.items():
        if key != "per_class":
            lines += _metric_lines(value, f"{prefix}.{key}" if prefix else str(key))
    return lines


def show_run(run_dir: str | Path) -> str:
    """A readable summary of one run: what was trained on what, and how well it did."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
    summary = summarize_run(run_dir)
    lines = [f"run       {run_dir}", f"status    {summary.status}", f"date      {summary.date or 'undated'}"]
    if summary.status == "unreadable":
        return "\n".join([*lines, "config.yaml or metrics.json could not be read"])
    config = _read_yaml(run_dir / "config.yaml")
    data, model, training = config.get("data") or {}, config.get("model") or {}, config.get("training") or {}
    split = data.get("split") or {}
    lines += [
        f"model     {model.get('name')}"
        + (" (pretrained)" if model.get("pretrained") else "")
        + (f" {model.get('kwargs')}" if model.get("kwargs") else ""),
        f"data      {data.get('source')}  size {data.get('image_size')}  channels {data.get('channels')}  "
        f"split {split.get('method')} {split.get('ratios')}",
        f"training  batch {training.get('batch_size')}  class weights {training.get('class_weights')}  "
        f"monitor {training.get('checkpoint_monitor')} ({training.get('checkpoint_mode')})",
    ]
    for number, phase in enumerate(training.get("phases") or [], start=1):
        scheduler = (phase.get("scheduler") or {}).get("name")
        lines.append(
            f"  phase {number}: {phase.get('epochs')} epochs {phase.get('optimizer')} lr {phase.get('lr')} "
            f"scheduler {scheduler} trainable {phase.get('trainable')}"
        )
    label_map = _read_json(run_dir / "label_map.json")
    if label_map:
        lines.append(f"classes   {label_map}")
    runtime = f"{summary.runtime_seconds:.0f} s" if summary.runtime_seconds is not None else "-"
    lines.append(f"epochs    {summary.epochs} of {summary.planned_epochs or '?'}  runtime {runtime}")
    if summary.best is not None:
        lines.append(f"best      {summary.monitor} = {summary.best:.4f} at epoch {summary.best_epoch}")
    metrics = _read_json(run_dir / "metrics.json")
    test_lines = _metric_lines(metrics.get("test")) if isinstance(metrics, dict) else []
    if test_lines:
        lines += ["test metrics", *test_lines]
    history = read_history_rows(run_dir)
    if history:
        columns = [c for c in history[0] if any(math.isfinite(row.get(c, math.nan)) for row in history)]
        lines += ["history", "  " + "  ".join(f"{c:>12}" for c in columns)]
        for row in history:
            cells = [_cell(int(row[c]) if c in ("epoch", "phase") else row.get(c)) for c in columns]
            lines.append("  " + "  ".join(f"{cell:>12}" for cell in cells))
    return "\n".join(lines)
