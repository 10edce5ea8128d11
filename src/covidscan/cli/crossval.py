"""``covidscan crossval``: leave-one-source-out validation over a config's sources, with one report."""

from __future__ import annotations

import argparse

from covidscan.cli import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "crossval",
        help="leave-one-source-out validation: train without each source, test on it (resumable)",
        description="For a config whose data.source lists two or more named sources, train one run per source "
        "with that source held out (each on the others' own train/val split), evaluate it on every training "
        "source's test part and on the held-out source in full, and write report.html/report.md/crossval.json "
        "and auc_matrix.png: the train-sources x test-source matrix of ROC AUC and sensitivity/specificity at the "
        "val-chosen threshold with bootstrap 95%% CIs, and the in-source vs out-of-source gap. Running the same "
        "command again skips finished folds and resumes an interrupted one.",
    )
    add_config_arguments(parser)
    parser.add_argument("--out", help="output folder (default: <output_dir>/crossval/<name>/)")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the 95%% CIs (default 1000)"
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        metavar="S",
        help="choose each fold's threshold on its val split reaching this sensitivity (default: Youden's J)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.config import load_config
    from covidscan.evaluation.report import format_value
    from covidscan.tracking.crossval import cross_validate

    config = load_config(args.config, args.overrides)
    report = cross_validate(
        config, args.out, n_bootstrap=args.bootstrap, seed=args.seed, target_sensitivity=args.target_sensitivity
    )
    width = max(len(name) for name in report.sources)
    print(f"leave one source out, {report.name}: ROC AUC (rows: held-out source; *: out-of-source)")
    print(" " * (width + 2) + "".join(f"{name:>{width + 4}}" for name in report.sources))
    for fold in report.folds:
        cells = []
        for name in report.sources:
            cell = fold.cells.get(name)
            text = format_value(cell.roc_auc.value) if cell else "n/a"
            cells.append(f"{text + ('*' if cell and not cell.in_source else ''):>{width + 4}}")
        print(f"{fold.held_out:<{width + 2}}" + "".join(cells) + f"   {fold.verdict()}")
    print(
        f"mean in-source AUC {format_value(report.in_source_auc)}, mean out-of-source AUC "
        f"{format_value(report.out_of_source_auc)}, gap {format_value(report.gap)}"
    )
    print(f"report: {report.out_dir / 'report.html'}")
    return 0
