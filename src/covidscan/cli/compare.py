"""``covidscan compare``: study A's table of models with CIs, pairwise tests and prediction grids."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from covidscan.evaluation.stats import TestResult


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare trained runs on the same test items or patients (metrics with CIs + pairwise tests)",
        description="Evaluate every run on the same items (or, with --level patient, the same patients) and write "
        "comparison.html/.md/.csv/.json: one row per model with each metric and its 95% CI, runtime "
        "and parameter count, ranked by --metric; McNemar, Fisher's exact and DeLong tests and paired "
        "bootstrap differences for every pair; a grid of test images with predicted vs true labels per "
        "model (item level only).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or checkpoint files (two or more)")
    parser.add_argument(
        "--data",
        help="common dataset (class folders or CSV manifest); default: each run's own "
        "split, which must hold the same items for every run",
    )
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        help="split to compare on (default: test, or val with a note when the runs' splits have no test items)",
    )
    parser.add_argument("--external", action="store_true", help="--data is an external dataset")
    parser.add_argument(
        "--label-map",
        nargs="+",
        default=[],
        metavar="DATASET_LABEL=CLASS",
        help="rename dataset labels to the models' classes",
    )
    parser.add_argument(
        "--metric",
        default="f1",
        help="rank by this metric: accuracy, sensitivity, specificity, precision, f1, roc_auc, "
        "pr_auc (and macro_f1, macro_auroc for 3+ classes); default f1",
    )
    parser.add_argument(
        "--level",
        choices=("auto", "item", "patient"),
        default="auto",
        help="compare per item, or per patient after aggregating each run's items (runs with "
        "different 3D stack depths); default auto: patient when the items are volume "
        "stacks, item otherwise",
    )
    parser.add_argument(
        "--aggregation",
        choices=("mean", "max"),
        default="mean",
        help="at patient level, how a patient's item probabilities combine (default: mean)",
    )
    parser.add_argument("--positive-class", help="positive class for binary metrics (default: COVID-like class)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    parser.add_argument("--grid-size", type=int, default=16, help="images per prediction grid (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap and grid seed (default 0)")
    parser.add_argument("--out", help="output folder (default: comparisons/ beside the first run)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.data.sources import parse_label_map
    from covidscan.evaluation.compare import compare_runs
    from covidscan.evaluation.report import format_metric

    result = compare_runs(
        args.runs,
        args.data,
        args.split,
        args.metric,
        args.out,
        args.bootstrap,
        parse_label_map(args.label_map),
        args.external,
        positive_class=args.positive_class,
        grid_size=args.grid_size,
        seed=args.seed,
        level=args.level,
        aggregation=args.aggregation,
    )
    unit = f"{result.n_compared} {result.level}s"
    if result.aggregation:
        unit += f", {result.aggregation} of their items"
    for note in result.notes:
        print(f"note: {note}")
    print(f"ranked by {args.metric} on {result.dataset} ({result.split}, {unit}):")
    for row in result.rows:
        print(f"  {row.rank}. {row.run:<32} {format_metric(row.metrics[args.metric])}")
    for pair in result.pairs:
        tests = ", ".join(_format_test(t) for t in pair.tests)
        print(f"  {pair.a} vs {pair.b}: {tests}")
    print(f"report: {result.out_dir}/comparison.html")
    return 0


def _format_test(test: TestResult) -> str:
    p_value = "undefined" if test.p_value is None else format(test.p_value, ".3g")
    return f"{test.test.split(' ')[0]} p={p_value}{test.stars}"
