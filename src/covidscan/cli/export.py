"""``covidscan export``: ONNX or TorchScript file with probabilities inside, checked against PyTorch."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to ONNX or TorchScript",
        description="Export a checkpoint (2D or 3D model) to ONNX or TorchScript. The exported model takes a "
        "preprocessed float32 batch, (N, C, S, S) images or (N, C, D, S, S) slice stacks, and returns class "
        "probabilities; <out>.json beside it holds the classes, input shape and normalisation. The export is "
        "compared with PyTorch before it is accepted.",
    )
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint .pt")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default: %(default)s")
    parser.add_argument("--out", help="output file (default: <run>/export/model.onnx or model.torchscript.pt)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from covidscan.serving import export_model

    result = export_model(args.checkpoint, args.format, args.out)
    print(f"{result.path} (+ {result.metadata_path.name}); max |p_export - p_pytorch| = {result.max_abs_diff:.2e}")
    return 0
