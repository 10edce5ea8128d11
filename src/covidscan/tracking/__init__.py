"""Experiment management: MLflow / TensorBoard tracking callbacks, Optuna sweeps, leave-one-source-out
cross-validation, run listing.

Names are imported on first use (PEP 562), so ``covidscan --help`` and the ``--track`` options do
not pay for the trainer, MLflow or Optuna.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "covidscan.tracking.options": ("TRACKERS", "add_tracking_arguments"),
    "covidscan.tracking.callbacks": (
        "TrackingCallback",
        "callbacks_from_args",
        "closing_on_error",
        "flatten",
        "make_trackers",
    ),
    "covidscan.runtime": ("is_main_process",),  # the one rank check, re-exported for tracking code
    "covidscan.tracking.mlflow": ("MLflowCallback", "default_tracking_uri"),
    "covidscan.tracking.tensorboard": ("TensorBoardCallback",),
    "covidscan.tracking.crossval": ("CrossValReport", "cross_validate"),
    "covidscan.tracking.runs": ("RunSummary", "find_run_dirs", "format_runs", "list_runs", "show_run", "summarize_run"),
    "covidscan.tracking.sweep": (
        "SweepResult",
        "TrialCallback",
        "load_search_space",
        "parse_search_space",
        "run_sweep",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'covidscan.tracking' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)


def __dir__() -> list[str]:
    return __all__
