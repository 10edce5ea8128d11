"""``covidscan study``: reproduce a whole study (train every run, write its paper tables) or list them."""

from __future__ import annotations

import argparse

BACKBONES = ("auto", "original", "offline")  # covidscan.studies.BACKBONES, without importing torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study",
        help="run a whole study of configs/studies/ (train every run, write the paper's tables)",
        description="Reproduce a study: train every run its study file lists (finished runs are skipped, an "
        "interrupted one resumes), then write the paper-style tables with 95%% CIs, Fisher tests against the first "
        "row and the published numbers as report.html, report.md and report.csv in the study directory.",
    )
    verbs = parser.add_subparsers(dest="study_verb", metavar="ACTION", required=True)
    run = verbs.add_parser("run", help="train and report one study", description=parser.description)
    run.add_argument(
        "study", metavar="STUDY", help="a study name (A..E, study_a) under configs/studies/, or a study file"
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a few images per class, tiny images, one epoch per phase (the study file's quick: "
        "section); written to <name>-quick so it never mixes with the full study",
    )
    run.add_argument("--out", metavar="DIR", help="study directory (default: runs/studies/<name>[-quick])")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, after the study file's own (repeatable), e.g. "
        "--set data.source=/data/my-copy --set training.device=cuda",
    )
    run.add_argument(
        "--backbones",
        choices=BACKBONES,
        default="auto",
        help="for runs with an offline variant: the original config when its ImageNet weights load here "
        "(auto, default), always the original, or always the offline variant",
    )
    run.add_argument("--unlabeled", metavar="DIR", help="folder of unlabeled images for the submission file (study A)")
    run.add_argument("--train-only", action="store_true", help="train (or resume) the runs, write no tables")
    run.set_defaults(handler=run_command)
    listing = verbs.add_parser("list", help="the study files under configs/studies/")
    listing.set_defaults(handler=list_command)


def run_command(args: argparse.Namespace) -> int:
    from covidscan.studies import run_study

    report = run_study(
        args.study,
        args.out,
        quick=args.quick,
        overrides=args.overrides,
        backbones=args.backbones,
        unlabeled=args.unlabeled,
        train_only=args.train_only,
    )
    if report is None:
        print("runs trained; no tables written (--train-only)")
        return 0
    print(f"study report: {report.out_dir / 'report.html'} (also report.md, report.csv)")
    for table in report.tables:
        print(f"  {table.title}: {len(table.rows)} rows on {table.split} ({table.n_compared} {table.level}s)")
    return 0


def list_command(args: argparse.Namespace) -> int:
    from covidscan.studies import list_studies, load_study

    for path in list_studies():
        spec = load_study(path)
        runs = sum(1 for _ in spec.runs)
        print(f"{path.stem}: {spec.title} ({runs} run entries, {len(spec.tables)} tables) - {path}")
    return 0
