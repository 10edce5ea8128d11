"""Checkpoints: the one contract between training and everything that uses a trained model.

A checkpoint holds the model's registry name and weights *and* the resolved run config, class
names and normalisation statistics, so evaluation, prediction, explanation and serving rebuild the
exact preprocessing of training from the file alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidscan.config import RunConfig, config_from_dict
from covidscan.data.records import DataError
from covidscan.data.transforms import NormStats, build_transform
from covidscan.runtime import atomic_path

CHECKPOINT_FORMAT = 1
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: RunConfig,
    class_names: list[str],
    norm_stats: NormStats | None,
    epoch: int,
    metrics: dict[str, float] | None = None,
    training_state: dict[str, Any] | None = None,
) -> None:
    """Write atomically (temp + rename): an interrupted save never corrupts the previous file."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "class_names": list(class_names),
        "norm_stats": None if norm_stats is None else {"mean": norm_stats.mean, "std": norm_stats.std},
        "epoch": epoch,
        "metrics": metrics or {},
        "state_dict": model.state_dict(),
        "training_state": training_state,  # optimizer/scheduler/history for resume (last.pt only)
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (uses ``checkpoints/best.pt``) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / BEST_NAME, path / BEST_NAME, path / "checkpoints" / LAST_NAME):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"{path}: no checkpoints/{BEST_NAME} in this run directory; did training finish an epoch?"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint or run directory not found")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable covidscan checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a covidscan checkpoint (format {CHECKPOINT_FORMAT} expected)")
    payload["path"] = str(path)
    return payload


def class_probabilities(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Softmax head -> softmax; sigmoid head -> per-class sigmoids renormalised to sum to 1, so both
    heads give one probability vector per item (what metrics, reports and the API show)."""
    if head == "sigmoid":
        scores = torch.sigmoid(logits.float())
        return scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.softmax(logits.float(), dim=1)


@dataclass
class LoadedModel:
    """A trained model ready for inference, with the preprocessing it was trained with."""

    model: nn.Module
    config: RunConfig
    class_names: list[str]
    norm_stats: NormStats | None
    checkpoint_path: Path
    metrics: dict[str, float]

    @property
    def run_dir(self) -> Path:
        parent = self.checkpoint_path.parent
        return parent.parent if parent.name == "checkpoints" else parent

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def transform(self):
        return build_transform(self.config.data, train=False, stats=self.norm_stats)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return class_probabilities(logits, self.config.model.head)

    @torch.inference_mode()
    def predict_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Class probabilities (N, K) for a preprocessed batch."""
        return self.probabilities(self.model(batch.to(self.device)).float()).cpu().numpy()


def build_model_from_config(config: RunConfig, num_classes: int) -> nn.Module:
    from covidscan.models import create_model

    in_channels = config.data.channels
    return create_model(
        config.model.name, num_classes=num_classes, in_channels=in_channels, pretrained=False, **config.model.kwargs
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the trained model from a run directory or checkpoint file (no weight downloads)."""
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"])
    class_names = payload["class_names"]
    model = build_model_from_config(config, len(class_names))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise DataError(
            f"{payload['path']}: its weights do not fit model {config.model.name!r} as this covidscan "
            f"version builds it (was the checkpoint made by another version, or edited?): "
            f"{str(exc).splitlines()[0]} ..."
        ) from exc
    model.eval().to(device)
    stats = payload.get("norm_stats")
    return LoadedModel(
        model,
        config,
        class_names,
        NormStats(**stats) if stats else None,
        Path(payload["path"]),
        payload.get("metrics", {}),
    )
