"""Human-readable reports (HTML with embedded figures, and Markdown) rendered with Jinja2."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from covidscan.data import read_image
from covidscan.data.records import DataError
from covidscan.data.volumes import STACK_SEPARATOR
from covidscan.evaluation.calibration import ReliabilityTable
from covidscan.evaluation.metrics import METRIC_LABELS, MetricValue
from covidscan.evaluation.plots import plot_confusion, plot_prediction_grid, plot_reliability, plot_roc_pr
from covidscan.runtime import write_text

if TYPE_CHECKING:
    from covidscan.evaluation.evaluate import Evaluation

logger = logging.getLogger(__name__)

FIGURES = {
    "confusion_matrix": "confusion_matrix.png",
    "roc_pr_curves": "roc_pr_curves.png",
    "reliability_diagram": "reliability_diagram.png",
}
GRID_FIGURE = "prediction_grid.png"  # study D's figure; only for sets of 2D images


def format_value(value: float | None, digits: int = 3) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def format_metric(metric: MetricValue, digits: int = 3) -> str:
    """``0.912 (0.871-0.944)``, or ``undefined: <reason>``."""
    if metric.value is None:
        return f"undefined: {metric.undefined or 'not computable'}"
    text = format_value(metric.value, digits)
    if metric.ci_low is not None and metric.ci_high is not None:
        text += f" ({format_value(metric.ci_low, digits)}-{format_value(metric.ci_high, digits)})"
    return text


def format_cam_share(cam_lung: dict[str, Any] | None) -> str:
    """A lung check (:func:`covidscan.explain.lung_check.cam_lung_check`) in one table cell:
    ``0.250 (3 of 4 images)``, or ``-`` when not measured or no image could be measured."""
    if cam_lung is None or cam_lung["mean_outside_share"] is None:
        return "-"
    return f"{format_value(cam_lung['mean_outside_share'])} ({cam_lung['n_measured']} of {cam_lung['n_images']} images)"


def data_uri(path: Path) -> str:
    """A PNG as a data URI, so the HTML report is one self-contained file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def template_environment(package: str = "covidscan.evaluation") -> Environment:
    """The Jinja environment of the reports (metric/value/data_uri/cam_share filters, metric labels), loading
    templates from ``package``'s ``templates`` folder."""
    env = Environment(
        loader=PackageLoader(package, "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(metric=format_metric, value=format_value, data_uri=data_uri, cam_share=format_cam_share)
    env.globals["labels"] = METRIC_LABELS
    return env


def render(template: str, **context: Any) -> str:
    return template_environment().get_template(template).render(**context)


def _grid_items(evaluation: Evaluation, size: int, seed: int) -> list[int]:
    """A reproducible sample of items, wrong predictions first so the grid shows failures."""
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(evaluation.predicted != evaluation.predictions.y_true)
    right = np.flatnonzero(evaluation.predicted == evaluation.predictions.y_true)
    picked = list(rng.permutation(wrong)[: size // 2])
    picked += list(rng.permutation(right)[: size - len(picked)])
    return sorted(int(i) for i in picked)


def prediction_grid(evaluation: Evaluation, path: Path, size: int = 16, seed: int = 0) -> Path | None:
    """Study D's grid of test images titled predicted vs true label; None when the items are not
    2D images (slice stacks of scans) or cannot be read, or ``size`` is 0 (no grid asked for)."""
    predictions, names = evaluation.predictions, evaluation.predictions.class_names
    if size < 1 or any(STACK_SEPARATOR in p for p in predictions.paths):
        return None
    items = _grid_items(evaluation, size, seed)
    try:
        images = [read_image(predictions.paths[i]) for i in items]
    except (DataError, OSError, ValueError) as exc:
        logger.warning("prediction grid skipped: %s", exc)
        return None
    return plot_prediction_grid(
        images,
        [names[predictions.y_true[i]] for i in items],
        [names[evaluation.predicted[i]] for i in items],
        path,
        confidences=[float(predictions.proba[i].max()) for i in items],
    )


def write_evaluation_report(
    evaluation: Evaluation, reliability: ReliabilityTable, grid_size: int = 16, seed: int = 0
) -> dict[str, str]:
    """Figures (with study D's prediction grid for 2D images), ``report.html`` and ``report.md`` for
    one evaluation; returns the figure file names."""
    report, predictions, out_dir = evaluation.report, evaluation.predictions, evaluation.out_dir
    title = f"{report.model} on {report.dataset} ({report.split})"
    plot_confusion(
        np.array(report.confusion_matrix.counts), predictions.class_names, out_dir / FIGURES["confusion_matrix"], title
    )
    plot_roc_pr(predictions, report.positive_index, out_dir / FIGURES["roc_pr_curves"], title)
    plot_reliability(reliability, out_dir / FIGURES["reliability_diagram"], title)
    figures = dict(FIGURES)
    if grid_size > 0 and prediction_grid(evaluation, out_dir / GRID_FIGURE, grid_size, seed) is not None:
        figures["prediction_grid"] = GRID_FIGURE
    context = {"r": report, "title": title, "figures": figures, "out_dir": out_dir}
    write_text(out_dir / "report.html", render("evaluation.html.j2", **context))
    write_text(out_dir / "report.md", render("evaluation.md.j2", **context))
    return figures
