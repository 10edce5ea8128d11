"""``covidscan evaluate``: metrics with CIs, figures and a report for one trained run."""

from __future__ import annotations

import argparse

from covidscan.cli.predict import add_tta_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run (internal test split or an external dataset)",
        description="Predict a dataset with a trained run and write metrics.json, predictions.csv, figures and "
        "report.html/report.md (metrics with bootstrap 95% CIs) under RUN/evaluation/<name>/.",
    )
    parser.add_argument(
        "--checkpoint",
        "--run",
        dest="checkpoint",
        metavar="RUN",
        help="run directory (uses checkpoints/best.pt), checkpoint file or ensemble directory",
    )
    parser.add_argument(
        "--onnx",
        metavar="MODEL.onnx",
        help="evaluate this ONNX export with ONNX Runtime (with --checkpoint: on that run's splits)",
    )
    add_tta_argument(parser)
    parser.add_argument(
        "--data",
        help="dataset to evaluate on (class folders or CSV manifest); default: the run's own split from its splits.csv",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="which split to evaluate (used when the data has splits; default: test)",
    )
    parser.add_argument(
        "--external",
        action="store_true",
        help="--data is an external dataset never seen in training (report warns about "
        "domain shift; the whole dataset is evaluated unless it has a split column)",
    )
    parser.add_argument(
        "--label-map",
        nargs="+",
        default=[],
        metavar="DATASET_LABEL=CLASS",
        help="rename dataset labels to the model's classes, e.g. CT_NonCOVID=non-COVID",
    )
    parser.add_argument(
        "--positive-class",
        help="positive class for binary metrics (default: the class named like COVID, or data.positive_class)",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        metavar="S",
        help="choose the threshold on val reaching this sensitivity (default: Youden's J)",
    )
    parser.add_argument(
        "--temperature-scaling",
        action="store_true",
        help="fit a softmax temperature on the run's val split before evaluating",
    )
    parser.add_argument(
        "--aggregation",
        choices=("mean", "max"),
        default="mean",
        help="how slice/stack probabilities combine into a patient's (default: mean)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the 95%% CIs (default 1000; 0 = no CIs)",
    )
    parser.add_argument("--batch-size", type=int, help="inference batch size (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--out", help="output folder (default: RUN/evaluation/<split or dataset>)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.data.sources import parse_label_map
    from covidscan.errors import UsageError
    from covidscan.evaluation import evaluate
    from covidscan.evaluation.report import format_metric

    if args.checkpoint is None and args.onnx is None:
        raise UsageError("give --checkpoint RUN (run, checkpoint or ensemble directory) or --onnx MODEL.onnx")
    result = evaluate(
        args.checkpoint,
        args.data,
        args.split,
        args.out,
        parse_label_map(args.label_map),
        args.bootstrap,
        args.external,
        positive_class=args.positive_class,
        target_sensitivity=args.target_sensitivity,
        temperature_scaling=args.temperature_scaling,
        aggregation=args.aggregation,
        batch_size=args.batch_size,
        seed=args.seed,
        onnx=args.onnx,
        tta=args.tta,
    )
    payload = result.payload
    print(
        f"{payload['model']} ({payload['engine']}{', TTA ' + '+'.join(payload['tta']) if args.tta else ''}) on "
        f"{payload['dataset']} ({payload['split']}, {payload['n_items']} items), positive class "
        f"{payload['positive_class']}:"
    )
    for name, metric in payload["metrics"].items():
        print(f"  {name:<12} {format_metric(metric)}")
    print(f"report: {result.out_dir / 'report.html'}")
    return 0
