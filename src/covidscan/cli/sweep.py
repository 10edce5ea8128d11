"""``covidscan sweep``: Optuna hyper-parameter search where every trial is a normal training run."""

from __future__ import annotations

import argparse

from covidscan.cli import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    from covidscan.tracking.options import add_tracking_arguments

    parser = subparsers.add_parser(
        "sweep",
        help="hyper-parameter search (Optuna): random or TPE sampling, median pruning, resumable",
        description="Train one run per trial with values drawn from a search space (a YAML file mapping dotted "
        "config keys to distributions, see configs/sweeps/). Trials are stored in SQLite, so running "
        "the same command again resumes an interrupted sweep up to --trials in total. Writes "
        "summary.csv, summary.md and importance.png under <output_dir>/sweeps/<study>/.",
    )
    add_config_arguments(parser)
    parser.add_argument("--space", required=True, metavar="SPACE.yaml", help="search space YAML file")
    parser.add_argument(
        "--trials",
        type=int,
        required=True,
        metavar="N",
        help="total number of finished (completed or pruned) trials wanted",
    )
    parser.add_argument(
        "--sampler",
        choices=("random", "tpe"),
        default="random",
        help="random search (as study B) or Tree-structured Parzen Estimator (default: random)",
    )
    parser.add_argument(
        "--pruner",
        choices=("median", "none"),
        default="median",
        help="stop trials whose validation metric falls below the median of earlier trials "
        "at the same epoch (default: median)",
    )
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL (default: sqlite:///<output_dir>/sweeps/<study>.db)"
    )
    parser.add_argument("--study-name", default=None, help="study name (default: <config name>-sweep)")
    add_tracking_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.config import load_config
    from covidscan.tracking.sweep import run_sweep

    config = load_config(args.config, args.overrides)
    result = run_sweep(
        config,
        args.space,
        args.trials,
        sampler=args.sampler,
        pruner=args.pruner,
        storage=args.storage,
        study_name=args.study_name,
        track=args.track,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
    )
    print(result.summary_md.read_text(encoding="utf-8"))
    counts = ", ".join(f"{count} {state.lower()}" for state, count in sorted(result.counts.items()))
    print(f"study {result.study_name!r} ({result.storage}): {counts}")
    if result.best_params is not None:
        print(f"best value {result.best_value:.4g} with {result.best_params}\nbest run: {result.best_run_dir}")
    print(f"summary: {result.summary_csv}, {result.summary_md}")
    print(f"importance plot: {result.importance_plot or 'not drawn (fewer than 2 completed trials)'}")
    return 0
