"""``covidscan predict``: class predictions for many images, streamed to a resumable CSV."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict images or folders into a CSV (submission file)",
        description="Predict every PNG/JPEG/DICOM under --input into a CSV (path, predicted_label, prob_<class>..., "
        "error). Rows are flushed per batch; rerunning the same command resumes, skipping files already "
        "in the CSV. Unreadable files get an error row instead of stopping the run.",
    )
    parser.add_argument("--checkpoint", help="run directory or checkpoint .pt (not needed with --onnx)")
    parser.add_argument("--onnx", metavar="MODEL.onnx", help="run this exported model with ONNX Runtime instead")
    parser.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH", help="image files and/or folders")
    parser.add_argument("--out", "-o", default="predictions.csv", help="CSV to write or resume (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: all)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.serving import load_predictor, predict_files

    predictor = load_predictor(args.checkpoint, args.onnx, threads=args.threads)
    summary = predict_files(predictor, args.input, args.out, batch_size=args.batch_size, num_workers=args.workers)
    print(
        f"{summary.out}: {summary.predicted} predicted, {summary.failed} unreadable (see the error column), "
        f"{summary.skipped} already done"
    )
    return 0
