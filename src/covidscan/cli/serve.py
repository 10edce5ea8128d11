"""``covidscan serve``: the HTTP API and web page for one trained model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP with a web page",
        description="Serve a trained model: POST /v1/predict, /v1/explain, /v1/preview, /v1/studies (a whole CT "
        "study); GET /v1/model, /healthz, /docs (OpenAPI) and a web page at /. Research use only, not a diagnosis.",
    )
    parser.add_argument("--checkpoint", help="run directory or checkpoint .pt (needed for Grad-CAM)")
    parser.add_argument("--onnx", metavar="MODEL.onnx", help="predict with this exported model (ONNX Runtime)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: %(default)s)"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=8192,
        help="largest accepted image side in pixels, checked before decoding (default: %(default)s)",
    )
    parser.add_argument(
        "--max-study-mb", type=float, default=1024.0, help="largest accepted study upload (default: %(default)s)"
    )
    parser.add_argument(
        "--max-slices", type=int, default=2000, help="most files in one study upload (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: all)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.optional import optional_import
    from covidscan.serving import UploadLimits, create_app
    from covidscan.serving.study_upload import StudyLimits

    uvicorn = optional_import("uvicorn", extra="serve")

    limits = UploadLimits(max_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels)
    study_limits = StudyLimits(max_upload_bytes=int(args.max_study_mb * 1024 * 1024), max_slices=args.max_slices)
    app = create_app(args.checkpoint, onnx=args.onnx, limits=limits, study_limits=study_limits, threads=args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
