"""``covidscan predict``: class predictions for many images, streamed to a resumable CSV."""

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
        help="predict images or folders into a CSV (submission file)",
        description="Predict every PNG/JPEG/DICOM under --input into a CSV (path, predicted_label, prob_<class>..., "
        "error). Rows are flushed per batch; rerunning the same command resumes, skipping files already "
        "in the CSV. Unreadable files get an error row instead of stopping the run. <out>.json records the "
        "model, version and TTA. Research use only, not a diagnosis.",
    )
    parser.add_argument(
        "--checkpoint", help="run directory, checkpoint .pt, ensemble directory or .onnx (not needed with --onnx)"
    )
    parser.add_argument("--onnx", metavar="MODEL.onnx", help="run this exported model with ONNX Runtime instead")
    parser.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH", help="image files and/or folders")
    parser.add_argument("--out", "-o", default="predictions.csv", help="CSV to write or resume (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: all)")
    add_tta_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.inference import RESEARCH_USE_NOTICE, load_predictor
    from covidscan.serving import predict_files

    predictor = load_predictor(args.checkpoint, args.onnx, tta=args.tta, threads=args.threads)
    summary = predict_files(predictor, args.input, args.out, batch_size=args.batch_size, num_workers=args.workers)
    print(
        f"{summary.out}: {summary.predicted} predicted, {summary.failed} unreadable (see the error column), "
        f"{summary.skipped} already done. {RESEARCH_USE_NOTICE}"
    )
    return 0
