"""Export a trained model (2D or 3D) to ONNX or TorchScript, probabilities inside, metadata beside it.

The exported graph ends in the checkpoint's own probability function (softmax, or renormalised
sigmoids), so every runtime returns the same numbers as the PyTorch predictor. A JSON file
``<model>.json`` carries the class names, input shape and normalisation, which is all
``covidscan.inference.load_predictor(onnx=...)`` needs to run the file without the checkpoint.
Each export is checked against PyTorch on a check batch — 2D images ``(N, C, S, S)`` or 3D slice
stacks ``(N, C, D, S, S)`` — before it is reported as done.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from covidscan.checkpoint import ModelFileError
from covidscan.errors import UsageError
from covidscan.inference import METADATA_FORMAT, OnnxEngine, Predictor, load_predictor, metadata_path
from covidscan.optional import optional_import
from covidscan.runtime import atomic_path, write_json

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "torchscript"]
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4  # max abs difference in probabilities accepted between PyTorch and the export


class ProbabilityModel(nn.Module):
    """The classifier followed by the checkpoint's probability function, as one exportable graph."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model
        self.sigmoid_head = head == "sigmoid"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model(image)
        if self.sigmoid_head:
            scores = torch.sigmoid(logits)
            return scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata_path: Path
    max_abs_diff: float  # probabilities, export vs PyTorch, on the check batch


def export_model(
    checkpoint: str | Path,
    fmt: ExportFormat = "onnx",
    out: str | Path | None = None,
    *,
    check_batch: torch.Tensor | None = None,
) -> ExportResult:
    """Export ``checkpoint`` (run dir or .pt) and verify it against PyTorch on ``check_batch``
    (preprocessed items; random ones when None).

    ``out`` defaults to ``<run>/export/model<suffix>``. The batch axis is dynamic. Raises ValueError
    when the exported model disagrees with PyTorch by more than ``TOLERANCE``.
    """
    if fmt not in SUFFIXES:
        raise UsageError(f"export format must be one of {sorted(SUFFIXES)}, got {fmt!r}")
    if fmt == "onnx":  # torch.onnx writes with onnx + onnxscript; the check runs ONNX Runtime
        for module in ("onnx", "onnxscript", "onnxruntime"):
            optional_import(module, extra="export")
    predictor = load_predictor(checkpoint)
    if predictor.is_ensemble:
        raise ModelFileError(f"{checkpoint}: an ensemble is exported member by member (members/*/checkpoints)")
    member = predictor.members[0]
    if member.explain_model is None:
        raise ModelFileError(f"{checkpoint}: export needs a PyTorch checkpoint (run directory or .pt file)")
    wrapper = ProbabilityModel(member.explain_model, member.config.model.head).eval()
    shape = member.preprocessing.input_shape()
    path = Path(out) if out else (member.run_dir or member.source.parent) / "export" / f"model{SUFFIXES[fmt]}"
    example = torch.rand(2, *shape)  # batch 2: keeps the axis dynamic
    with atomic_path(path) as tmp:
        if fmt == "onnx":
            _export_onnx(wrapper, example, tmp)
        else:
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(wrapper, example), str(tmp))

    stats = member.preprocessing.norm_stats
    meta = metadata_path(path)
    axes = (
        ["batch", "channels", "depth", "height", "width"]
        if len(shape) == 4
        else ["batch", "channels", "height", "width"]
    )
    write_json(
        meta,
        {
            "format": METADATA_FORMAT,
            "runtime": fmt,
            "input": {
                "name": "image",
                "shape": ["batch", *shape],
                "axes": axes,
                "dtype": "float32",
                "preprocessing": "covidscan.inference.Preprocessing(config.data, norm_stats)"
                + (" of a scan's slice stacks" if len(shape) == 4 else " of a decoded image"),
            },
            "output": {
                "name": "probabilities",
                "shape": ["batch", len(predictor.class_names)],
                "meaning": f"{member.config.model.head} class probabilities, summing to 1",
            },
            "card": asdict(member.card),
            "version": member.card.version,
            "run_dir": str(member.run_dir.resolve()) if member.run_dir else None,
            "config": member.config.to_dict(),
            "norm_stats": None if stats is None else {"mean": stats.mean, "std": stats.std},
        },
    )
    batch = check_batch if check_batch is not None else torch.rand(3, *shape)
    diff = max_abs_difference(predictor, path, fmt, batch)
    if diff > TOLERANCE:
        path.unlink()
        meta.unlink()
        raise ValueError(
            f"{path}: exported model differs from PyTorch by {diff:.2e} (> {TOLERANCE}); "
            "try the other format or report the model name"
        )
    log.info("exported %s (%s); max |p_export - p_torch| = %.2e", path, fmt, diff)
    return ExportResult(path, meta, diff)


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export-based exporter first (the maintained path); the TorchScript-based one as fallback.
    Weights stay inside the file (no ``.onnx.data`` beside it), so copying the file copies the model."""
    batch = torch.export.Dim("batch", min=1)
    try:
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=True,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_shapes={"image": {0: batch}},
            external_data=False,  # one self-contained file (weights inside), whatever the model's size
            verbose=False,
        )
        return
    except Exception as exc:  # the dynamo exporter fails on some graphs; the legacy one covers those
        log.warning("dynamo ONNX export failed (%s); retrying with the TorchScript-based exporter", exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["probabilities"],
            opset_version=17,
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
        )


def max_abs_difference(predictor: Predictor, path: Path, fmt: ExportFormat, batch: torch.Tensor) -> float:
    """Largest absolute difference between the exported model's probabilities and PyTorch's."""
    expected = predictor.predict_batch(batch)
    if fmt == "onnx":
        actual = OnnxEngine(path)(batch)
    else:
        with torch.inference_mode():
            actual = torch.jit.load(str(path), map_location="cpu")(batch).numpy()
    return float(np.max(np.abs(actual - expected)))
