"""Checkpoints: the one contract between training and everything that uses a trained model.

A checkpoint holds the model's registry name and weights *and* the resolved run config, class
names and normalisation statistics, so evaluation, prediction, explanation and serving rebuild the
exact preprocessing of training from the file alone (``covidscan.inference.load_predictor``).

Loading never runs code from the file. Checkpoints are shared and downloaded, and a pickle can
call any function while it is read, so files are read with ``torch.load(weights_only=True)``:
tensors, numbers, strings and plain containers only. The one NumPy object a payload holds (the
NumPy RNG state saved for ``train --resume``) is stored as a tagged tensor and turned back into an
array on load. A file that needs full pickle — a checkpoint written before this rule, or a crafted
one — is refused with the command that converts it, to be run only on files one trusts.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidscan.config import RunConfig
from covidscan.data.records import DataError
from covidscan.data.transforms import NormStats
from covidscan.runtime import atomic_path

CHECKPOINT_FORMAT = 1
BEST_NAME = "best.pt"
LAST_NAME = "last.pt"
_NDARRAY = "__covidscan_ndarray__"  # key marking a NumPy array stored as a tensor


class ModelFileError(DataError):
    """A checkpoint, exported model or ensemble directory that cannot be used; the message names
    the file and the fix."""


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
        "training_state": training_state,  # optimizer/scheduler/history/RNG for resume (last.pt only)
    }
    with atomic_path(path) as tmp:
        torch.save({**to_safe(payload), "state_dict": model.state_dict()}, tmp)


def to_safe(value: Any) -> Any:
    """``value`` with NumPy arrays as tagged tensors and NumPy scalars as Python numbers, so that
    ``torch.load(weights_only=True)`` reads it back without allowing any other type."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError("a checkpoint cannot hold NumPy object arrays (they need full pickle)")
        return {_NDARRAY: torch.from_numpy(np.array(value, copy=True)), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: to_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_safe(item) for item in value)
    return value


def from_safe(value: Any) -> Any:
    """The inverse of :func:`to_safe`."""
    if isinstance(value, dict):
        if _NDARRAY in value:
            return value[_NDARRAY].numpy().astype(np.dtype(value["dtype"]), copy=False)
        return {key: from_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(from_safe(item) for item in value)
    return value


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
    """The payload of a run directory's or a file's checkpoint, read without unpickling code."""
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only raises for anything outside its allow-list
        raise ModelFileError(
            f"{path}: refused: this file needs full pickle to load ({_unsafe_reason(exc)}), and unpickling "
            "can run code hidden in a checkpoint. If it is a covidscan checkpoint from an older version "
            f"and you trust where it came from, convert it once with `covidscan convert {path}`"
        ) from None
    except Exception as exc:  # truncated zip, not a torch file, ...: torch raises many types
        raise ModelFileError(f"{path}: not a readable covidscan checkpoint ({_first_line(exc)})") from None
    _check_payload(payload, path)
    payload = {key: value if key == "state_dict" else from_safe(value) for key, value in payload.items()}
    payload["path"] = str(path)
    return payload


def _check_payload(payload: Any, path: Path) -> None:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path}: not a covidscan checkpoint (format {CHECKPOINT_FORMAT} expected)")


def convert_checkpoint(path: str | Path, out: str | Path | None = None) -> Path:
    """Rewrite a full-pickle covidscan checkpoint in the safe format (``out`` defaults to ``path``,
    the original kept as ``<name>.pickle-backup``). **Unpickles the file: run it only on files you trust.**"""
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)  # the one trusted, explicit full load
    except Exception as exc:  # torch raises many types on broken files
        raise ModelFileError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    _check_payload(payload, path)
    state_dict = payload.pop("state_dict")
    payload.pop("path", None)
    target = Path(out) if out is not None else path
    if target == path:
        backup = path.with_name(path.name + ".pickle-backup")
        backup.write_bytes(path.read_bytes())
    with atomic_path(target) as tmp:
        torch.save({**to_safe(payload), "state_dict": state_dict}, tmp)
    load_checkpoint(target)  # proves the result loads safely
    return target


def _unsafe_reason(exc: Exception) -> str:
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().removeprefix("WeightsUnpickler error: ")
    return "objects outside the safe allow-list"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def class_probabilities(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Softmax head -> softmax; sigmoid head -> per-class sigmoids renormalised to sum to 1, so both
    heads give one probability vector per item (what metrics, reports and the API show)."""
    if head == "sigmoid":
        scores = torch.sigmoid(logits.float())
        return scores / scores.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.softmax(logits.float(), dim=1)


def build_model_from_config(config: RunConfig, num_classes: int) -> nn.Module:
    from covidscan.models import create_model_from_config

    return create_model_from_config(config, num_classes, load_weights=False)
