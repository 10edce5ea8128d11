"""``covidscan predict``: class predictions for many images or whole CT studies, streamed to a resumable CSV."""

from __future__ import annotations

import argparse

TTA_VIEWS = ("identity", "hflip", "shift")  # covidscan.inference.TTA_VIEWS, without importing torch
DEFAULT_TTA = ("identity", "hflip")


def add_tta_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta",
        nargs="?",
        const=",".join(DEFAULT_TTA),
        metavar="VIEWS",
        help=f"test-time augmentation: mean of the probabilities over these views (comma-separated from "
        f"{', '.join(TTA_VIEWS)}; default when given alone: {','.join(DEFAULT_TTA)})",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict images, or whole CT studies, into a CSV (submission file)",
        description="Predict every PNG/JPEG/DICOM under --input into a CSV (path, predicted_label, prob_<class>..., "
        "error), or with --studies one row per CT study (DICOM series folder or zip, NIfTI volume, folder of "
        "slices): the slices (2D models) or slice stacks (3D models) aggregated into one verdict. Studies are "
        "the default for 3D models and when every input is a DICOM folder, zip or NIfTI file. Rows are flushed "
        "as they are done; rerunning the same command resumes. Unreadable inputs get an error row instead of "
        "stopping the run. <out>.json records the model, version and TTA. Research use only, not a diagnosis.",
    )
    parser.add_argument(
        "--checkpoint", help="run directory, checkpoint .pt, ensemble directory or .onnx (not needed with --onnx)"
    )
    parser.add_argument("--onnx", metavar="MODEL.onnx", help="run this exported model with ONNX Runtime instead")
    parser.add_argument("--input", "-i", nargs="+", metavar="PATH", help="image files and/or folders")
    parser.add_argument(
        "--out",
        "-o",
        help="CSV to write or resume (default: predictions.csv); with --dicomweb a folder (dicomweb-results)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: all)")
    add_tta_argument(parser)
    unit = parser.add_mutually_exclusive_group()
    unit.add_argument("--studies", action="store_true", help="one row per study (default: automatic, see above)")
    unit.add_argument("--images", action="store_true", help="one row per image file, even for DICOM folders")
    parser.add_argument("--every", type=int, default=1, metavar="K", help="studies, 2D models: every K-th slice")
    parser.add_argument(
        "--aggregation",
        choices=("mean", "max", "topk"),
        default="mean",
        help="studies: how slice/stack probabilities make the study's (default: %(default)s; topk = mean of the "
        "--top-k highest per class)",
    )
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="studies: K for --aggregation topk")
    parser.add_argument("--per-slice", metavar="CSV", help="studies: also write one row per slice or stack here")
    parser.add_argument(
        "--include-identifiers",
        action="store_true",
        help="studies: keep patient identifiers in outputs (left out by default)",
    )
    pacs = parser.add_argument_group("a study held by a PACS (DICOMweb), instead of --input")
    pacs.add_argument("--dicomweb", metavar="URL", help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    pacs.add_argument("--study", metavar="UID", help="Study Instance UID of the study to predict")
    pacs.add_argument("--series", metavar="UID", help="this series instead of the study's axial CT series")
    pacs.add_argument(
        "--store-results",
        action="store_true",
        help="store the Structured Report and the CAM overlay back in the study (never done without this flag)",
    )
    parser.set_defaults(handler=run)


def _studies_mode(args: argparse.Namespace, spatial_dims: int) -> bool:
    """Studies when asked, for 3D models, or when every input looks like a study."""
    from pathlib import Path

    from covidscan.data.readers import is_dicom_file, is_nifti

    if args.studies or spatial_dims == 3:
        return True
    if args.images:
        return False

    def study_like(path: Path) -> bool:
        if path.is_dir():
            return any(is_dicom_file(p) for p in path.iterdir())
        return path.suffix.lower() == ".zip" or is_nifti(path)

    return all(study_like(Path(item)) for item in args.input)


def run(args: argparse.Namespace) -> int:
    from covidscan.errors import UsageError
    from covidscan.inference import RESEARCH_USE_NOTICE, load_predictor
    from covidscan.serving import predict_files, predict_studies

    if bool(args.input) == bool(args.dicomweb):
        raise UsageError("give either --input PATH... or --dicomweb URL --study UID")
    if args.dicomweb and not args.study:
        raise UsageError("--dicomweb needs --study UID (the Study Instance UID to predict)")
    if not args.dicomweb and (args.study or args.series or args.store_results):
        raise UsageError("--study, --series and --store-results apply to --dicomweb")
    if args.dicomweb and (args.per_slice or args.include_identifiers or args.images):
        raise UsageError("--per-slice, --include-identifiers and --images do not apply to --dicomweb")
    predictor = load_predictor(args.checkpoint, args.onnx, tta=args.tta, threads=args.threads)
    if args.dicomweb:
        return _predict_dicomweb(predictor, args)
    out = args.out or "predictions.csv"
    if _studies_mode(args, predictor.spatial_dims):
        studies = predict_studies(
            predictor,
            args.input,
            out,
            per_slice=args.per_slice,
            every=args.every,
            aggregation=args.aggregation,
            top_k=args.top_k,
            batch_size=args.batch_size,
            include_identifiers=args.include_identifiers,
        )
        print(
            f"{studies.out}: {studies.predicted} studies predicted, {studies.failed} unreadable (see the error "
            f"column), {studies.skipped} already done. {RESEARCH_USE_NOTICE}"
        )
        return 0
    if args.per_slice:
        raise UsageError("--per-slice applies to --studies")
    summary = predict_files(predictor, args.input, out, batch_size=args.batch_size, num_workers=args.workers)
    print(
        f"{summary.out}: {summary.predicted} predicted, {summary.failed} unreadable (see the error column), "
        f"{summary.skipped} already done. {RESEARCH_USE_NOTICE}"
    )
    return 0


def _predict_dicomweb(predictor, args: argparse.Namespace) -> int:
    from covidscan.notices import RESEARCH_USE_NOTICE
    from covidscan.serving.pacs import aggregation_rule, predict_pacs_study

    result = predict_pacs_study(
        predictor,
        args.dicomweb,
        args.study,
        args.out or "dicomweb-results",
        series_uid=args.series,
        store=args.store_results,
        every=args.every,
        aggregation=args.aggregation,
        top_k=args.top_k,
        batch_size=args.batch_size,
    )
    prediction = result.prediction
    label = prediction.predicted_label
    where = (
        f"stored in the PACS ({len(result.stored)} objects)"
        if args.store_results
        else "not stored in the PACS (add --store-results)"
    )
    print(
        f"study {result.study_instance_uid}: {label} ({prediction.probabilities[label]:.3f}, "
        f"{aggregation_rule(prediction)}); series {prediction.series['series_instance_uid']} "
        f"({prediction.series['selection']}); SR and overlay written to {result.files[0].parent}, {where}. "
        f"{RESEARCH_USE_NOTICE}"
    )
    return 0
