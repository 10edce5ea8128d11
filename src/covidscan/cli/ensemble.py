"""``covidscan ensemble``: several trained runs as one model that every command accepts like a run."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ensemble",
        help="combine trained runs into an ensemble directory (mean of their probabilities)",
        description="Write an ensemble directory: a copy of each run's checkpoint, checked to predict the same "
        "classes and decode inputs alike, combined by the mean of their class probabilities. evaluate, "
        "predict, serve and explain take the directory like a run. When all runs share one splits.csv it is "
        "copied, so the ensemble has their test split; otherwise evaluate it with --data.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories or checkpoint files (two or more)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new ensemble directory")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.inference import load_ensemble, make_ensemble

    out = make_ensemble(args.runs, args.out)
    predictor = load_ensemble(out)
    shared = (out / "splits.csv").is_file()
    print(
        f"{out}: ensemble of {len(predictor.members)} ({predictor.card.architecture}), version "
        f"{predictor.card.version}; "
        + ("members share one splits.csv (copied)" if shared else "members' splits differ: evaluate with --data")
    )
    return 0
