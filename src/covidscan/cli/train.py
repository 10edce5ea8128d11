"""``covidscan train``: train a model from a YAML config (also under ``torchrun`` for DDP)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from covidscan.cli import add_config_arguments
from covidscan.errors import UsageError

if TYPE_CHECKING:
    from covidscan.evaluation.results import EvaluationReport


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a config file",
        description="Train a model from a YAML run config. Writes a run directory (splits, history, plots, "
        "checkpoints, metrics.json) and evaluates the best checkpoint on the test split. "
        "Runs unchanged under `torchrun --nproc_per_node N` for distributed training.",
    )
    add_config_arguments(parser)
    parser.add_argument("--run-dir", help="write the run here instead of <output_dir>/<name>-<timestamp>")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from RUN_DIR/checkpoints/last.pt; its config.yaml is "
        "used unless --config is given (--set overrides still apply; a change to the model, data or a "
        "started phase is refused before RUN_DIR is touched)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse to train when val/test share patients or near-duplicate images with train",
    )
    parser.add_argument(
        "--adapt-to",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="unlabelled images of the site the model will serve (folders, images or manifests): "
        "domain-adversarial training towards them (sets training.domain_adaptation.target; keep the "
        "patients you will evaluate on out of it)",
    )
    from covidscan.tracking.options import add_tracking_arguments

    add_tracking_arguments(parser)  # --track mlflow|tensorboard, --tracking-uri, --experiment
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from covidscan.config import load_config
    from covidscan.runtime import is_main_process
    from covidscan.training import train

    if args.resume and args.run_dir:
        raise UsageError("--resume RUN_DIR already names the run directory; drop --run-dir")
    if args.resume and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"{args.resume}: no such run directory to resume")
    config_path = args.config or (str(Path(args.resume) / "config.yaml") if args.resume else None)
    config = load_config(config_path, args.overrides)
    if args.strict:
        config.training.strict_leakage = True
    if args.adapt_to:  # the config's weight / hidden / lr stay when it has the section
        from dataclasses import replace

        from covidscan.config import DomainAdaptationConfig

        section = config.training.domain_adaptation
        targets = list(args.adapt_to)
        config.training.domain_adaptation = (
            replace(section, target=targets) if section else DomainAdaptationConfig(target=targets)
        )
    from covidscan.tracking import callbacks_from_args

    trackers = callbacks_from_args(args)  # a failed or interrupted run ends its tracked runs (on_exception)
    result = train(config, run_dir=args.resume or args.run_dir, resume=bool(args.resume), callbacks=trackers)
    if is_main_process():
        print(f"run directory: {result.run_dir}")
        summary = {"best": result.best_metrics, "test": _headline(result.test_metrics)}
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _headline(evaluation: EvaluationReport | None) -> dict[str, float | None] | None:
    """Test metric values (CIs and the full report are under RUN/evaluation/test/)."""
    if evaluation is None:
        return None
    return {name: metric.value for name, metric in evaluation.metrics.items()}
