"""What the tracking callbacks share: config flattening, metric filtering, building trackers from ``--track``.

The trackers also check ``covidscan.runtime.is_main_process()`` themselves (the trainer already calls
callbacks on rank 0 only), so a tracker built by hand inside a ``torchrun`` worker never writes one
run per GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from covidscan.errors import UsageError
from covidscan.evaluation.results import metrics_to_dict
from covidscan.tracking.options import TRACKERS
from covidscan.training.callbacks import Callback
from covidscan.training.reporting import TestEvaluation

if TYPE_CHECKING:
    from covidscan.evaluation.results import EvaluationReport
    from covidscan.training.loop import TrainingLoop


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"phases": [{"lr": 1e-3}]}}`` -> ``{"training.phases.0.lr": 1e-3}``: the
    same dotted keys ``--set`` and sweep spaces use, so a logged param can be pasted back."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and tree and any(isinstance(v, (dict, list)) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (trackers reject NaN, text and nested values)."""
    numbers = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            numbers[key] = float(value)
    return numbers


def evaluation_scalars(test_metrics: EvaluationReport | None) -> dict[str, float]:
    """The headline test metrics of an evaluation result: accuracy 0.9 with CI (0.85, 0.95) ->
    ``{"accuracy": .9, "accuracy_ci_low": .85, "accuracy_ci_high": .95, ...}``."""
    if test_metrics is None:
        return {}
    metrics = metrics_to_dict(test_metrics.metrics)
    return {
        key.removesuffix(".value").replace(".", "_"): value for key, value in numeric_metrics(flatten(metrics)).items()
    }


class TrackingCallback(Callback):
    """A trainer callback that records a run elsewhere; ``close(status)`` ends it, also when training
    fails (``on_exception``: KILLED for an interrupt or a pruned trial, FAILED otherwise)."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and end the tracked run (idempotent)."""

    def on_exception(self, loop: TrainingLoop, error: BaseException) -> None:
        self.close(exit_status(error))


def final_test_scalars(loop: TrainingLoop) -> dict[str, float]:
    """The loop's test-split evaluation as flat scalars (empty without a ``TestEvaluation``)."""
    evaluation = loop.callback(TestEvaluation)
    return evaluation_scalars(evaluation.result if evaluation is not None else None)


def exit_status(error: BaseException) -> str:
    """How a tracked run that raised ``error`` ends: KILLED (interrupt, pruned trial) or FAILED."""
    optuna = sys.modules.get("optuna")  # a pruned trial can only come from an imported optuna
    pruned = optuna is not None and isinstance(error, optuna.TrialPruned)
    return "KILLED" if pruned or isinstance(error, KeyboardInterrupt) else "FAILED"


def make_trackers(
    names: Sequence[str],
    tracking_uri: str | None = None,
    experiment: str | None = None,
    tags: dict[str, str] | None = None,
) -> list[TrackingCallback]:
    """The callbacks for ``--track mlflow tensorboard`` (``tags`` label the MLflow run);
    unknown names are a ValueError."""
    unknown = sorted(set(names) - set(TRACKERS))
    if unknown:
        raise UsageError(f"unknown tracker(s) {unknown}; choose from {list(TRACKERS)}")
    trackers: list[TrackingCallback] = []
    if "mlflow" in names:
        from covidscan.tracking.mlflow import MLflowCallback

        trackers.append(MLflowCallback(tracking_uri=tracking_uri, experiment=experiment, tags=tags))
    if "tensorboard" in names:
        from covidscan.tracking.tensorboard import TensorBoardCallback

        trackers.append(TensorBoardCallback())
    return trackers


def callbacks_from_args(args: argparse.Namespace) -> list[TrackingCallback]:
    """The trackers a parsed command line asks for (none when ``--track`` is absent)."""
    return make_trackers(
        getattr(args, "track", None) or [], getattr(args, "tracking_uri", None), getattr(args, "experiment", None)
    )


@contextmanager
def closing_on_error(callbacks: Sequence[Callback]) -> Iterator[None]:
    """End tracked runs as KILLED or FAILED when the block raises, so the MLflow UI never shows a
    dead run as still running. ``train`` does this itself (``on_exception``); this is for trackers
    driven by hand."""
    try:
        yield
    except BaseException as exc:
        for callback in callbacks:
            if isinstance(callback, TrackingCallback):
                callback.close(exit_status(exc))
        raise
