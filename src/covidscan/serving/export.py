"""Export a trained model to ONNX or TorchScript, with probabilities inside and metadata beside it.

The exported graph ends in the checkpoint's own probability function (softmax, or renormalised
sigmoids), so every runtime returns the same numbers as ``LoadedModel.predict_batch``. A JSON file
``<model>.json`` carries the class names, input size and normalisation, which is all
:class:`~covidscan.serving.engine.OnnxPredictor` needs to serve the file without the checkpoint.
Each export is checked against PyTorch before it is reported as done.
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

from covidscan.checkpoint import LoadedModel, load_model
from covidscan.errors import UsageError
from covidscan.optional import optional_import
from covidscan.runtime import atomic_path, write_json
from covidscan.serving.engine import METADATA_FORMAT, OnnxPredictor, metadata_path, model_card

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "torchscript"]
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4  # max abs difference in probabilities accepted between PyTorch and the export


class ProbabilityModel(nn.Module):
    """The classifier followed by the checkpoint's probability function, as one exportable graph."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = loaded.model
        self.sigmoid_head = loaded.config.model.head == "sigmoid"

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
    max_abs_diff: float  # probabilities, export vs PyTorch, on a random check batch


def export_model(
    checkpoint: str | Path,
    fmt: ExportFormat = "onnx",
    out: str | Path | None = None,
    *,
    check_batch: torch.Tensor | None = None,
) -> ExportResult:
    """Export ``checkpoint`` (run dir or .pt) and verify it against PyTorch on ``check_batch``.

    ``out`` defaults to ``<run>/export/model<suffix>``. The batch axis is dynamic. Raises ValueError
    when the exported model disagrees with PyTorch by more than ``TOLERANCE``.
    """
    if fmt not in SUFFIXES:
        raise UsageError(f"export format must be one of {sorted(SUFFIXES)}, got {fmt!r}")
    if fmt == "onnx":  # torch.onnx writes with onnx + onnxscript; the check runs ONNX Runtime
        for module in ("onnx", "onnxscript", "onnxruntime"):
            optional_import(module, extra="export")
    loaded = load_model(checkpoint)
    wrapper = ProbabilityModel(loaded).eval()
    data = loaded.config.data
    if data.spatial_dims != 2:
        raise UsageError(f"{checkpoint}: export supports 2D image models; this one is 3D")
    path = Path(out) if out else loaded.run_dir / "export" / f"model{SUFFIXES[fmt]}"
    example = torch.rand(2, data.channels, data.image_size, data.image_size)  # batch 2: keeps the axis dynamic
    with atomic_path(path) as tmp:
        if fmt == "onnx":
            _export_onnx(wrapper, example, tmp)
        else:
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(wrapper, example), str(tmp))

    card = model_card(loaded)
    stats = loaded.norm_stats
    meta = metadata_path(path)
    write_json(
        meta,
        {
            "format": METADATA_FORMAT,
            "runtime": fmt,
            "input": {
                "name": "image",
                "shape": ["batch", data.channels, data.image_size, data.image_size],
                "dtype": "float32",
                "preprocessing": "covidscan build_transform(config.data, train=False)",
            },
            "output": {
                "name": "probabilities",
                "shape": ["batch", len(loaded.class_names)],
                "meaning": f"{loaded.config.model.head} class probabilities, summing to 1",
            },
            "card": asdict(card),
            "version": card.version,
            "config": loaded.config.to_dict(),
            "norm_stats": None if stats is None else {"mean": stats.mean, "std": stats.std},
        },
    )
    batch = check_batch if check_batch is not None else torch.rand(3, data.channels, data.image_size, data.image_size)
    diff = max_abs_difference(loaded, path, fmt, batch)
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
    """torch.export-based exporter first (the maintained path); the TorchScript-based one as fallback."""
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


def max_abs_difference(loaded: LoadedModel, path: Path, fmt: ExportFormat, batch: torch.Tensor) -> float:
    """Largest absolute difference between the exported model's probabilities and PyTorch's."""
    expected = loaded.predict_batch(batch)
    if fmt == "onnx":
        actual = OnnxPredictor(path).predict_batch(batch)
    else:
        with torch.inference_mode():
            actual = torch.jit.load(str(path), map_location="cpu")(batch).numpy()
    return float(np.max(np.abs(actual - expected)))
