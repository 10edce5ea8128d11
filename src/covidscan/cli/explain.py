"""``covidscan explain``: Grad-CAM / Grad-CAM++ / Smooth Grad-CAM++ overlays for a trained model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

METHODS = ("gradcam", "gradcampp", "smoothgradcampp")  # covidscan.explain.CAM_METHODS, without importing torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="class activation maps (overlay PNG + raw .npy) for images or scans",
        description="Explain a trained model's predictions with Grad-CAM, Grad-CAM++ or Smooth Grad-CAM++. "
        "Writes <name>.png (heatmap over the grayscale slice, or a slice montage for 3D scans), "
        "<name>.npy (the map in [0, 1] at the model's input size) and explanations.csv.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN",
        help="run directory (uses checkpoints/best.pt), checkpoint file or ensemble directory (an ONNX export "
        "cannot be explained: CAMs need the PyTorch model)",
    )
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="images or folders of images (2D models); NIfTI files, DICOM series folders or "
        "folders of them (3D models)",
    )
    parser.add_argument("--method", choices=METHODS, default="gradcam", help="CAM method (default: gradcam)")
    parser.add_argument(
        "--class",
        dest="target_class",
        metavar="NAME",
        help="explain this class (e.g. COVID) instead of the predicted one",
    )
    parser.add_argument("--samples", type=int, default=8, help="noisy copies for smoothgradcampp (default 8)")
    parser.add_argument(
        "--sigma",
        type=float,
        default=0.1,
        help="noise std for smoothgradcampp, as a fraction of the input's range (default 0.1)",
    )
    parser.add_argument(
        "--layer",
        metavar="NAME",
        help="module to explain (a name from model.named_modules()); default: the model's "
        "cam_target, the last feature map of its backbone",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <run>/explanations/<method>)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.explain import explain_files
    from covidscan.inference import load_predictor

    predictor = load_predictor(args.checkpoint)
    predictor.require_explainable()
    run_dir = predictor.run_dir or predictor.source.parent
    out_dir = Path(args.out) if args.out else run_dir / "explanations" / args.method
    summary, failures = explain_files(
        predictor,
        args.input,
        out_dir,
        args.method,
        args.target_class,
        layer=args.layer,
        samples=args.samples,
        sigma=args.sigma,
    )
    print(f"explanations written to {out_dir} (summary: {summary.name})")
    for path, error in failures.items():
        print(f"covidscan explain: skipped {path}: {error}", file=sys.stderr)
    return 1 if failures else 0
