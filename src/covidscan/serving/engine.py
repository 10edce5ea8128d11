"""One inference interface over a PyTorch checkpoint or an exported ONNX model.

Batch prediction and the HTTP server take either engine, so the ONNX path runs through the same
code (and tests) as the PyTorch one. Preprocessing always comes from the training config, stored in
the checkpoint or in the JSON metadata written beside an exported model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from covidscan import __version__
from covidscan.checkpoint import LoadedModel, load_model, resolve_checkpoint
from covidscan.config import RunConfig, config_from_dict
from covidscan.data.records import DataError
from covidscan.data.transforms import NormStats, build_transform
from covidscan.errors import UsageError
from covidscan.optional import optional_import

METADATA_FORMAT = "covidscan-export/1"


@dataclass(frozen=True)
class ModelCard:
    """What a client needs to know about the served model: identity, classes and input."""

    model_id: str  # the run directory's name
    architecture: str
    class_names: list[str]
    input_size: int
    channels: int
    normalize: str
    head: str
    checkpoint_sha256: str
    epoch: int | None
    covidscan_version: str = __version__
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """Package version + checkpoint hash + epoch: changes whenever the weights change."""
        epoch = "" if self.epoch is None else f".e{self.epoch}"
        return f"{self.covidscan_version}+{self.checkpoint_sha256[:12]}{epoch}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "version": self.version}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(loaded: LoadedModel) -> ModelCard:
    """Describe a loaded checkpoint; the epoch is read with ``mmap`` so the weights are not loaded twice."""
    payload = torch.load(loaded.checkpoint_path, map_location="cpu", mmap=True, weights_only=False)
    data = loaded.config.data
    return ModelCard(
        model_id=loaded.run_dir.name,
        architecture=loaded.config.model.name,
        class_names=list(loaded.class_names),
        input_size=data.image_size,
        channels=data.channels,
        normalize=data.normalize,
        head=loaded.config.model.head,
        checkpoint_sha256=file_sha256(loaded.checkpoint_path),
        epoch=payload.get("epoch"),
        metrics={k: float(v) for k, v in loaded.metrics.items() if isinstance(v, (int, float))},
    )


class Predictor(Protocol):
    """Class probabilities for preprocessed batches, plus the preprocessing that makes them."""

    engine: str
    card: ModelCard
    config: RunConfig
    norm_stats: NormStats | None

    def predict_batch(self, batch: torch.Tensor) -> np.ndarray: ...


def preprocessing(predictor: Predictor):
    """The deterministic evaluation transform the model was trained with: (H, W) [0, 1] -> (C, S, S)."""
    return build_transform(predictor.config.data, train=False, stats=predictor.norm_stats)


class TorchPredictor:
    """A checkpoint run eagerly in PyTorch; ``loaded`` is kept for Grad-CAM."""

    engine = "pytorch"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.norm_stats = loaded.norm_stats
        self.card = model_card(loaded)

    def predict_batch(self, batch: torch.Tensor) -> np.ndarray:
        return self.loaded.predict_batch(batch)


class OnnxPredictor:
    """An exported ``.onnx`` file run with ONNX Runtime (CPU), described by its metadata JSON."""

    engine = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = optional_import("onnxruntime", extra="export")
        self.path = Path(path)
        metadata = read_export_metadata(self.path)
        self.config = config_from_dict(metadata["config"])
        stats = metadata.get("norm_stats")
        self.norm_stats = NormStats(**stats) if stats else None
        self.card = ModelCard(**metadata["card"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict_batch(self, batch: torch.Tensor) -> np.ndarray:
        array = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        return self.session.run(None, {self.input_name: array})[0]


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
    metadata = json.loads(meta.read_text())
    if metadata.get("format") != METADATA_FORMAT:
        raise DataError(f"{meta}: not covidscan export metadata (format {METADATA_FORMAT} expected)")
    return metadata


def load_predictor(
    checkpoint: str | Path | None = None, onnx: str | Path | None = None, threads: int | None = None
) -> Predictor:
    """ONNX Runtime when ``onnx`` is given (the checkpoint is then not needed), PyTorch otherwise."""
    if onnx is None and checkpoint is None:
        raise UsageError("give a checkpoint (run directory or .pt file) or an exported .onnx model")
    if threads:
        torch.set_num_threads(threads)
    predictor: Predictor = (
        OnnxPredictor(onnx, threads=threads)
        if onnx is not None
        else TorchPredictor(load_model(resolve_checkpoint(checkpoint)))
    )
    if predictor.config.data.spatial_dims != 2:
        raise UsageError(f"{onnx or checkpoint}: a 3D (volume) model; serving and batch prediction take 2D images")
    return predictor
