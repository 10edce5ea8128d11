"""``covidscan runs``: list past runs and show one, from the run directories alone."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "runs",
        help="list past runs with their key metrics, or show one run",
        description="Read run directories (config.yaml, history.csv, metrics.json); no tracking server needed. "
        "Crashed or interrupted runs are listed with status 'incomplete'.",
    )
    verbs = parser.add_subparsers(dest="runs_verb", metavar="{list,show}", required=True)

    list_parser = verbs.add_parser(
        "list",
        help="one line per run under ROOT (sweep trials included)",
        description="List runs under ROOT, newest first unless --sort is given.",
    )
    list_parser.add_argument("root", nargs="?", default="runs", metavar="ROOT", help="runs folder (default: runs)")
    list_parser.add_argument(
        "--sort",
        metavar="COLUMN",
        help="sort by a column, highest first: test_auc, test_accuracy, test_f1, best, "
        "runtime_seconds, epochs, date, name, ...",
    )
    list_parser.add_argument("--ascending", action="store_true", help="sort lowest first (e.g. for val_loss)")
    list_parser.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format (default: table)"
    )
    list_parser.set_defaults(handler=run_list)

    show_parser = verbs.add_parser(
        "show",
        help="config summary, metrics and history of one run",
        description="Print what a run trained on what, its best epoch, test metrics "
        "with 95%% CIs, and its per-epoch history.",
    )
    show_parser.add_argument("run", metavar="RUN", help="run directory")
    show_parser.set_defaults(handler=run_show)


def run_list(args: argparse.Namespace) -> int:
    from covidscan.tracking.runs import format_runs, list_runs

    print(format_runs(list_runs(args.root, sort=args.sort, ascending=args.ascending), args.format))
    return 0


def run_show(args: argparse.Namespace) -> int:
    from covidscan.tracking.runs import show_run

    print(show_run(args.run))
    return 0
