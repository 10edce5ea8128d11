"""``covidscan evaluate``: metrics with CIs, figures and a report for one trained run, on its own test
split and on any number of external sets (one combined report, in-source and external side by side)."""

from __future__ import annotations

import argparse

from covidscan.cli.predict import add_tta_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run (internal test split and/or external datasets)",
        description="Predict datasets with a trained run and write metrics.json, predictions.csv, figures and "
        "report.html/report.md (metrics with bootstrap 95%% CIs) under RUN/evaluation/<name>/. With external sets, "
        "the run's own test split is evaluated too and one report puts them side by side (RUN/evaluation/summary/): "
        "AUC with CIs, sensitivity/specificity at the val-chosen threshold and a verdict on how well the model "
        "transfers.",
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
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="dataset to evaluate on (class folders or CSV manifest), repeatable; NAME names its section and "
        "folder; default: the run's own split from its splits.csv",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="which split to evaluate (the run's own; and a dataset's when it has splits; default: test)",
    )
    parser.add_argument(
        "--external",
        nargs="*",
        metavar="[NAME=]PATH",
        help="external datasets never seen in training, evaluated whole unless they have a split column; "
        "a bare --external marks the --data sets as external. The report warns about domain shift and compares "
        "every external set with the run's own test split",
    )
    parser.add_argument(
        "--label-map",
        nargs="+",
        default=[],
        metavar="[SET:]DATASET_LABEL=CLASS",
        help="rename dataset labels to the model's classes, e.g. CT_NonCOVID=non-COVID for every set, or "
        "covid-ct:NonCOVID=non-COVID for the set named (or whose folder is named) covid-ct only",
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
    parser.add_argument(
        "--grid-size",
        type=int,
        default=16,
        help="images in prediction_grid.png, titled predicted vs true label (study D's figure; 2D images "
        "only; default 16, 0: none)",
    )
    parser.add_argument(
        "--cam-lung",
        type=int,
        default=0,
        metavar="N",
        help="explain up to N images of each set (a seeded sample) with Grad-CAM and report the share of the "
        "model's attention outside the lungs, a shortcut check for 2D CT models (default 0: off)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap, grid and --cam-lung seed (default 0)")
    parser.add_argument(
        "--out",
        help="output folder (default: RUN/evaluation/<split or dataset>; with several sets, the combined "
        "report's folder, each set in a sub-folder)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.data.records import DataError
    from covidscan.data.sources import parse_label_map
    from covidscan.errors import UsageError
    from covidscan.evaluation import evaluate
    from covidscan.evaluation.evaluate import dataset_name
    from covidscan.evaluation.report import format_metric
    from covidscan.evaluation.transfer import EvaluationSetSpec, evaluate_sets, parse_set_spec, split_label_maps

    if args.checkpoint is None and args.onnx is None:
        raise UsageError("give --checkpoint RUN (run, checkpoint or ensemble directory) or --onnx MODEL.onnx")
    marked_external = args.external == []  # a bare --external marks the --data sets
    given = [(*parse_set_spec(text), marked_external) for text in args.data]
    given += [(*parse_set_spec(text), True) for text in args.external or []]
    if marked_external and not given:
        raise DataError("--external needs a dataset the model never saw: --external PATH, or --data PATH --external")
    keys = [name or dataset_name(path) for name, path, _ in given]
    shared, scoped = split_label_maps(args.label_map, keys)
    shared_map = parse_label_map(shared)
    specs = [
        EvaluationSetSpec(path, name, {**shared_map, **parse_label_map(scoped[key])}, external)
        for (name, path, external), key in zip(given, keys)
    ]
    options = dict(
        n_bootstrap=args.bootstrap,
        positive_class=args.positive_class,
        target_sensitivity=args.target_sensitivity,
        temperature_scaling=args.temperature_scaling,
        aggregation=args.aggregation,
        batch_size=args.batch_size,
        seed=args.seed,
        grid_size=args.grid_size,
        onnx=args.onnx,
        tta=args.tta,
        cam_lung=args.cam_lung,
    )
    if len(specs) <= 1 and not any(spec.external for spec in specs):
        spec = specs[0] if specs else None
        result = evaluate(
            args.checkpoint,
            spec.data if spec else None,
            args.split,
            args.out,
            spec.label_map if spec else shared_map,
            name=spec.name if spec else None,
            **options,
        )
        report = result.report
        tta = f", TTA {'+'.join(report.tta)}" if args.tta else ""
        print(
            f"{report.model} ({report.engine}{tta}) on {report.dataset} ({report.split}, {report.n_items} items), "
            f"positive class {report.positive_class}:"
        )
        for name, metric in report.metrics.items():
            print(f"  {name:<12} {format_metric(metric)}")
        print(f"report: {result.out_dir / 'report.html'}")
        return 0

    summary = evaluate_sets(
        args.checkpoint, specs, args.split, args.out, reference=any(spec.external for spec in specs), **options
    )
    print(f"{summary.model}, positive class {summary.positive_class}:")
    for note in summary.notes:
        print(f"note: {note}")
    width = max(len(row.name) for row in summary.rows)
    kind_width = max(len(row.kind) for row in summary.rows)
    for row in summary.rows:
        print(
            f"  {row.name:<{width}}  {row.kind:<{kind_width}}  n={row.n_items:<6} AUC {format_metric(row.roc_auc)}  "
            f"sensitivity {format_metric(row.sensitivity)}  specificity {format_metric(row.specificity)}  "
            f"{row.verdict}"
        )
    print(f"report: {summary.out_dir}/report.html")
    return 0
