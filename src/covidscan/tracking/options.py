"""The ``--track`` command-line options, kept free of heavy imports so ``covidscan --help`` stays fast."""

from __future__ import annotations

import argparse

TRACKERS = ("mlflow", "tensorboard")


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """``--track`` / ``--tracking-uri`` / ``--experiment``, shared by ``train`` and ``sweep``."""
    group = parser.add_argument_group("experiment tracking")
    group.add_argument(
        "--track",
        nargs="+",
        choices=TRACKERS,
        default=[],
        metavar="{mlflow,tensorboard}",
        help="log params, per-epoch metrics and artefacts to MLflow and/or TensorBoard",
    )
    group.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (a server such as http://host:5000, or sqlite:///file.db); "
        "default sqlite:///<output_dir>/mlflow.db",
    )
    group.add_argument("--experiment", default=None, help="MLflow experiment name (default: the config's name)")
