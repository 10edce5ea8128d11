"""Runtimes that turn a preprocessed batch into class probabilities: eager PyTorch or ONNX Runtime.

Both return float32 ``(N, K)`` probabilities computed exactly as in training (softmax, or
renormalised sigmoids; an exported graph has that step inside). An exported model carries its
preprocessing and model card in ``<model>.json`` beside it (``covidscan export`` writes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from covidscan.checkpoint import ModelFileError, class_probabilities
from covidscan.optional import optional_import

METADATA_FORMAT = "covidscan-export/1"


class Engine(Protocol):
    name: str

    def __call__(self, batch: torch.Tensor) -> np.ndarray: ...


class TorchEngine:
    """A module run eagerly; ``model`` is what Grad-CAM differentiates."""

    name = "pytorch"

    def __init__(self, model: nn.Module, head: str) -> None:
        self.model = model.eval()
        self.head = head

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return class_probabilities(self.model(batch.to(self.device)), self.head).cpu().numpy()

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class OnnxEngine:
    """An exported ``.onnx`` file run with ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = optional_import("onnxruntime", extra="export")
        self.path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own exception types for broken files
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelFileError(
                f"{self.path}: not a loadable ONNX model ({detail[:200]}); the file may be truncated or not "
                "made by `covidscan export`: export it again"
            ) from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        array = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        return self.session.run(None, {self.input_name: array})[0]

    def parameter_count(self) -> int:
        onnx = optional_import("onnx", extra="export")
        graph = onnx.load(str(self.path), load_external_data=False).graph
        return int(sum(np.prod(init.dims, dtype=np.int64) for init in graph.initializer))


def metadata_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the metadata travels with the file it describes."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def read_export_metadata(model_path: str | Path) -> dict[str, Any]:
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: exported model not found; create it with `covidscan export`")
    meta = metadata_path(model_path)
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta}: metadata missing; re-export with `covidscan export` so classes and "
            "preprocessing travel with the model"
        )
    try:
        metadata = json.loads(meta.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{meta}: not valid JSON ({exc}); re-export with `covidscan export`") from None
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
        raise ModelFileError(f"{meta}: not covidscan export metadata (format {METADATA_FORMAT} expected)")
    return metadata
