"""``covidscan data``: inspect, split and audit datasets, or write the embedded demo set."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from covidscan.config import ReadLimits, SourceSpec


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="*",
        help="folder of class sub-folders (optionally under train/ val/ test/), "
        "a CSV manifest path,label[,patient_id][,split], or 'sample' (the demo set); several are "
        "loaded together as named sources (named after their folders)",
    )
    parser.add_argument(
        "--config",
        help="take the sources (with their names and label maps), data.label_map and data.limits from a run config",
    )
    parser.add_argument(
        "--label-map", nargs="+", default=[], metavar="RAW=CLASS", help="rename raw labels, e.g. CT_NonCOVID=non-COVID"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unknown file types, empty class folders and bad manifest rows (listed) instead of stopping",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="inspect, split and audit datasets",
        description="Inspect, split and audit datasets; write the demo sample.",
    )
    verbs = parser.add_subparsers(dest="data_verb", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    info = verbs.add_parser(
        "info",
        help="classes, counts, patients and predefined splits of a source",
        description="Print classes, image counts, patients and predefined splits.",
    )
    _add_source_arguments(info)
    info.set_defaults(handler=_info)

    split = verbs.add_parser(
        "split",
        help="assign train/val/test and save splits.csv",
        description="Split a source (patient-grouped when patient ids exist) and save "
        "path,label,patient_id,split to a CSV that `train` and `data audit` "
        "can reuse (data.split.method: file).",
    )
    _add_source_arguments(split)
    split.add_argument("--out", required=True, help="splits CSV to write")
    split.add_argument(
        "--method",
        default="auto",
        choices=["auto", "stratified", "grouped", "kfold", "predefined"],
        help="auto = predefined > grouped (patient ids) > stratified (default: auto)",
    )
    split.add_argument(
        "--ratios",
        nargs=3,
        type=float,
        default=[0.8, 0.1, 0.1],
        metavar=("TRAIN", "VAL", "TEST"),
        help="shares summing to 1; 0 leaves a split empty, e.g. 0.7 0 0.3 (default 0.8 0.1 0.1)",
    )
    split.add_argument("--folds", type=int, default=5, help="k for --method kfold (default 5)")
    split.add_argument("--fold", type=int, default=0, help="which fold is the test split (default 0)")
    split.add_argument("--seed", type=int, default=42, help="random seed; same seed, same split (default 42)")
    split.add_argument(
        "--stratify-by-source",
        action="store_true",
        help="several sources: stratify by label x source, so every split keeps each source's class mix",
    )
    split.set_defaults(handler=_split)

    audit = verbs.add_parser(
        "audit",
        help="leakage guard: duplicates, near-duplicates, patients across splits",
        description="Report class counts, image sizes and modes, unreadable files, exact "
        "and near-duplicate images (perceptual hash) inside the data and across "
        "train/val/test, and patients spanning splits.",
    )
    _add_source_arguments(audit)
    audit.add_argument("--splits", help="splits CSV (from `data split` or a run directory) to audit across")
    audit.add_argument(
        "--out",
        help="write the full report as JSON here (for split data, also OUT.png: each "
        "val/test image's distance to its nearest train image)",
    )
    audit.add_argument(
        "--threshold", type=int, default=24, help="near-duplicate Hamming distance in phash bits (default 24 of 256)"
    )
    audit.add_argument(
        "--hash-size",
        type=int,
        default=16,
        help="phash side: 16 (256 bits, default), 8 (64 bits, coarse: matches different patients' CT slices), 24, ...",
    )
    audit.add_argument(
        "--strict",
        action="store_true",
        help="exit with an error when val/test share near-duplicates or patients with train",
    )
    audit.set_defaults(handler=_audit)

    shortcuts = verbs.add_parser(
        "shortcuts",
        help="how well non-pathology signals (size, file, border, outside the lungs) predict the label",
        description="Shortcut audit: for each signal that is not pathology (image width/height/aspect, file size, "
        "JPEG quality, bit depth/mode, an 8x8 thumbnail, the image border, the image outside the lungs), the "
        "out-of-fold AUC [bootstrap 95%% CI] of a random forest that sees only that signal, with patient-grouped "
        "folds when patient ids exist. DICOM series folders are audited slice by slice.",
    )
    _add_source_arguments(shortcuts)
    shortcuts.add_argument("--out", help="folder for shortcuts.json, shortcuts.md and shortcuts.png")
    shortcuts.add_argument(
        "--signals", nargs="+", metavar="NAME", help="audit only these signals (default: all; see --help text)"
    )
    shortcuts.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    shortcuts.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI (default 1000)")
    shortcuts.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    shortcuts.add_argument(
        "--cam-run",
        metavar="RUN",
        help="also measure a trained 2D model: the share of its Grad-CAM mass outside the lungs on (up to 100 of) "
        "the run's test images",
    )
    shortcuts.set_defaults(handler=_shortcuts)

    sample = verbs.add_parser(
        "sample",
        help="write the embedded synthetic demo dataset",
        description="Write the synthetic demo CT set (class folders + manifest.csv with patient ids) to OUT.",
    )
    sample.add_argument("out", help="folder to write")
    sample.add_argument("--patients", type=int, default=12, help="patients per class (default 12)")
    sample.add_argument("--slices", type=int, default=4, help="slices per patient (default 4)")
    sample.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.set_defaults(handler=_sample)


class _SourceSpec(NamedTuple):
    source: SourceSpec
    label_map: dict[str, str]
    limits: ReadLimits | None  # None: the defaults
    max_per_class: int | None


def _source_spec(args: argparse.Namespace) -> _SourceSpec:
    """The sources to load (paths, or a config's named sources), their label map, read limits and
    per-class cap (a config's ``data.max_per_class``: the data verbs see what its run trains on).
    Each verb resolves it once (``--config`` read once) and passes it on."""
    from covidscan.config import load_config
    from covidscan.data.sources import parse_label_map
    from covidscan.errors import UsageError

    label_map = parse_label_map(args.label_map)
    if args.config:
        if args.source:
            raise UsageError("give either SOURCE ... or --config, not both")
        data = load_config(args.config).data
        return _SourceSpec(data.source, {**data.label_map, **label_map}, data.limits, data.max_per_class)
    if not args.source:
        raise UsageError("give a data source (folder, manifest or 'sample') or --config FILE")
    return _SourceSpec((args.source[0] if len(args.source) == 1 else args.source), label_map, None, None)


def _load(args: argparse.Namespace, spec: _SourceSpec, check_files: Literal["none", "header", "decode"] | None = None):
    """Load the sources; the data verbs print the manifest issues themselves, once, after their output."""
    from covidscan.data.records import DataWarning
    from covidscan.data.sources import load_samples

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_samples(
            spec.source,
            label_map=spec.label_map,
            skip_bad=args.skip_bad,
            max_per_class=spec.max_per_class,
            limits=spec.limits,
            check_files=check_files,
        )


def _print_problems(data) -> None:
    if data.skipped:
        print(f"skipped:  {len(data.skipped)} (first: {data.skipped[0][0]}: {data.skipped[0][1]})")
    for issue in data.issues:
        print(f"warning:  {issue.message}")


def _source_text(spec: _SourceSpec) -> str:
    from covidscan.data.sources import source_label

    return source_label(spec.source)


def _info(args: argparse.Namespace) -> int:
    from covidscan.data.splits import split_counts

    spec = _source_spec(args)
    data = _load(args, spec)
    cap = spec.max_per_class
    print(f"source:   {_source_text(spec)}")
    print(f"samples:  {len(data.samples)}" + (f" (data.max_per_class: {cap} per class and source)" if cap else ""))
    for name, count in data.class_counts().items():
        print(f"  {name}: {count}")
    patients = {(s.source, s.patient_id) for s in data.samples if s.patient_id}
    print(f"patients: {len(patients) or 'none (no patient ids)'}")
    sources = data.source_class_counts()
    if len(sources) > 1:
        width = max(len(name) for name in sources)
        print("per source:")
        for source, counts in sources.items():
            cells = ", ".join(f"{name}: {count}" for name, count in counts.items())
            ids = sum(1 for src, _ in patients if src == source)
            who = f"{ids} patients" if ids else "no patient ids"  # a source without ids leaks in a random split
            print(f"  {source:<{width}}  {sum(counts.values()):>6}  ({cells}; {who})")
    if any(s.split for s in data.samples):
        print(f"predefined splits: {split_counts(data)}")
    _print_problems(data)
    return 0


def _split(args: argparse.Namespace) -> int:
    from covidscan.config import ConfigError, SplitConfig
    from covidscan.data.splits import assign_splits, save_splits, split_counts

    try:
        config = SplitConfig(
            method=args.method,
            ratios=list(args.ratios),
            folds=args.folds,
            fold=args.fold,
            stratify_by_source=args.stratify_by_source,
        )
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("data.split.", "--")) from None
    data = _load(args, _source_spec(args))
    result = assign_splits(data, config, args.seed)
    path = save_splits(result, args.out)
    print(f"wrote {path}: {split_counts(result)}")
    _print_problems(data)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from covidscan.config import SplitConfig
    from covidscan.data.audit import audit_samples, enforce_leakage_rule, format_report
    from covidscan.data.splits import assign_splits
    from covidscan.runtime import write_json

    spec = _source_spec(args)
    data = _load(args, spec, check_files="none")  # the audit reads every file itself and lists the unreadable ones
    if args.splits:
        data = assign_splits(data, SplitConfig(method="file", file=args.splits), seed=0)
    plot = Path(args.out).with_suffix(".png") if args.out else None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = audit_samples(data, threshold=args.threshold, hash_size=args.hash_size, plot_path=plot)
    report.source, report.splits_file = _source_text(spec), args.splits
    if args.out:
        write_json(args.out, report.to_dict())
    print(format_report(report))
    for issue in data.issues:
        print(f"warning:  {issue.message}")
    if args.out:
        print(f"full report: {args.out}" + (f", plot: {report.plot}" if report.plot else ""))
    if args.strict and report.leakage is not None:
        enforce_leakage_rule(report.leakage, strict=True, refused_because="--strict")
    return 0


def _shortcuts(args: argparse.Namespace) -> int:
    from covidscan.data.shortcuts import audit_shortcuts, format_markdown, plot_shortcuts
    from covidscan.runtime import write_json, write_text

    report = audit_shortcuts(
        _load(args, _source_spec(args)),
        signals=args.signals,
        folds=args.folds,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    report = {"source": str(args.source), **report}
    if args.cam_run:
        report["model_check"] = _cam_check(args.cam_run)
    markdown = format_markdown(report, f"Shortcut audit of {args.source}")
    print(markdown)
    if report["unreadable"]:
        print(f"unreadable: {len(report['unreadable'])} (first: {report['unreadable'][0]['reason']})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "shortcuts.json", report)
        write_text(out / "shortcuts.md", markdown)
        plot_shortcuts(report, out / "shortcuts.png")
        print(f"written: {out / 'shortcuts.json'}, {out / 'shortcuts.md'}, {out / 'shortcuts.png'}")
    return 0


def _cam_check(run: str) -> dict:
    from covidscan.data.records import DataError
    from covidscan.data.splits import load_splits
    from covidscan.explain.lung_check import cam_lung_check
    from covidscan.inference import load_predictor

    predictor = load_predictor(run)
    if predictor.spatial_dims != 2 or predictor.run_dir is None:
        raise DataError(f"{run}: --cam-run measures a 2D model's run directory (with its splits.csv)")
    test = [s for s in load_splits(predictor.run_dir / "splits.csv").samples if s.split == "test"]
    if not test:
        raise DataError(f"{predictor.run_dir / 'splits.csv'}: no test split to explain")
    return {"run": str(predictor.run_dir), **cam_lung_check(predictor, test)}


def _sample(args: argparse.Namespace) -> int:
    from covidscan.data.sample import make_sample_dataset

    manifest = make_sample_dataset(
        args.out, patients_per_class=args.patients, slices_per_patient=args.slices, size=args.size, seed=args.seed
    )
    print(f"wrote {manifest} ({2 * args.patients * args.slices} images)")
    return 0
