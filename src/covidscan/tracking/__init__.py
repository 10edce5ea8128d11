"""Experiment management: MLflow / TensorBoard tracking callbacks, Optuna sweeps, run listing.

MLflow, Optuna and TensorBoard (the ``track`` extra) are imported only when used.
"""

from covidscan.tracking.callbacks import (
    TRACKERS,
    TrackingCallback,
    add_tracking_arguments,
    callbacks_from_args,
    closing_on_error,
    flatten,
    is_main_process,
    make_trackers,
)
from covidscan.tracking.mlflow import MLflowCallback, default_tracking_uri
from covidscan.tracking.runs import RunSummary, find_run_dirs, format_runs, list_runs, show_run, summarize_run
from covidscan.tracking.sweep import SweepResult, TrialCallback, load_search_space, parse_search_space, run_sweep
from covidscan.tracking.tensorboard import TensorBoardCallback

__all__ = [
    "TRACKERS", "MLflowCallback", "RunSummary", "SweepResult", "TensorBoardCallback", "TrackingCallback",
    "TrialCallback", "add_tracking_arguments", "callbacks_from_args", "closing_on_error", "default_tracking_uri",
    "find_run_dirs", "flatten", "format_runs", "is_main_process", "list_runs", "load_search_space",
    "make_trackers", "parse_search_space", "run_sweep", "show_run", "summarize_run",
]
