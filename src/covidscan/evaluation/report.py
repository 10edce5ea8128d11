"""Human-readable reports (HTML with embedded figures, and Markdown) rendered with Jinja2."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from covidscan.evaluation.calibration import ReliabilityTable
from covidscan.evaluation.metrics import METRIC_LABELS, PredictionSet
from covidscan.evaluation.plots import plot_confusion, plot_reliability, plot_roc_pr
from covidscan.runtime import write_text

FIGURES = {
    "confusion_matrix": "confusion_matrix.png",
    "roc_pr_curves": "roc_pr_curves.png",
    "reliability_diagram": "reliability_diagram.png",
}


def format_value(value: float | None, digits: int = 3) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def format_metric(metric: dict[str, Any], digits: int = 3) -> str:
    """``0.912 (0.871-0.944)``, or ``undefined: <reason>``."""
    if metric.get("value") is None:
        return f"undefined: {metric.get('undefined') or 'not computable'}"
    text = format_value(metric["value"], digits)
    if metric.get("ci_low") is not None and metric.get("ci_high") is not None:
        text += f" ({format_value(metric['ci_low'], digits)}-{format_value(metric['ci_high'], digits)})"
    return text


def data_uri(path: Path) -> str:
    """A PNG as a data URI, so the HTML report is one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("covidscan.evaluation", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(metric=format_metric, value=format_value, data_uri=data_uri)
    env.globals["labels"] = METRIC_LABELS
    return env


def render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(**context)


def write_evaluation_report(
    payload: dict[str, Any], predictions: PredictionSet, reliability: ReliabilityTable, out_dir: Path
) -> dict[str, str]:
    """Figures, ``report.html`` and ``report.md`` for one evaluation; returns figure file names."""
    title = f"{payload['model']} on {payload['dataset']} ({payload['split']})"
    plot_confusion(
        np.array(payload["confusion_matrix"]["counts"]),
        predictions.class_names,
        out_dir / FIGURES["confusion_matrix"],
        title,
    )
    positive = predictions.class_names.index(payload["positive_class"])
    plot_roc_pr(predictions, positive, out_dir / FIGURES["roc_pr_curves"], title)
    plot_reliability(reliability, out_dir / FIGURES["reliability_diagram"], title)
    context = {"r": payload, "title": title, "figures": FIGURES, "out_dir": out_dir}
    write_text(out_dir / "report.html", render("evaluation.html.j2", **context))
    write_text(out_dir / "report.md", render("evaluation.md.j2", **context))
    return dict(FIGURES)
