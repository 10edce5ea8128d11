"""Small synthetic inputs shared by several test modules (imported as ``helpers``)."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import covidscan  # noqa: F401  (compat shim before torchvision)
from covidscan.checkpoint import save_checkpoint
from covidscan.config import config_from_dict
from covidscan.data.synthetic import write_dicom_slice
from covidscan.models import ClassifierModel, create_model, register_model, unregister_model

CLASSES = ["COVID", "normal"]


@contextmanager
def registered_model(name: str, builder: Callable, **options) -> Iterator[str]:
    """A test-only model in the global registry for the duration of a test, then gone again,
    so no other test (e.g. one listing the registry) sees it, whatever the test order."""
    register_model(name, **options)(builder)
    try:
        yield name
    finally:
        unregister_model(name)


def write_image_folder(root: Path, classes: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """A folder-per-class tree of random grayscale PNGs; class c gets brightness offset c."""
    rng = np.random.default_rng(seed)
    for offset, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(rng.normal(60 + 100 * offset, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name} ({i}).png")
    return root


def make_checkpoint(
    root: Path,
    model: str = "cnn1",
    size: int = 32,
    channels: int = 1,
    epoch: int = 2,
    data: dict | None = None,
    seed: int | None = None,
    name: str | None = None,
) -> Path:
    """A random-init run directory: serving must not depend on the trainer. ``data`` adds data-config
    keys (e.g. a 3D stack layout), ``seed`` picks the random weights, ``name`` the run directory."""
    config = config_from_dict(
        {
            "name": f"{model}-test",
            "data": {"image_size": size, "channels": channels, **(data or {})},
            "model": {"name": model},
        }
    )
    if seed is not None:
        torch.manual_seed(seed)
    run = root / (name or f"{model}-run")
    save_checkpoint(
        run / "checkpoints" / "best.pt",
        model=create_model(model, len(CLASSES), in_channels=channels),
        config=config,
        class_names=CLASSES,
        norm_stats=None,
        epoch=epoch,
        metrics={"val_accuracy": 0.5},
    )
    return run


def png_bytes(size: tuple[int, int] = (40, 48), seed: int = 0, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def dicom_bytes(with_pixels: bool = True) -> bytes:
    """A minimal CT slice in DICOM Part 10 (uncompressed), in HU via RescaleIntercept."""
    hu = np.random.default_rng(1).integers(0, 2000, (36, 36)) - 1024.0 if with_pixels else None
    with tempfile.TemporaryDirectory() as folder:
        return write_dicom_slice(Path(folder) / "slice.dcm", hu, 0.0).read_bytes()


def tiny3d(num_classes: int, in_channels: int = 1, pretrained: bool = False, weights=None, **_) -> ClassifierModel:
    """A 3D classifier small enough to export and run in a unit test (register it with registered_model)."""
    backbone = nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2))
    head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, num_classes))
    return ClassifierModel(backbone, head, spatial_dims=3)


def write_nifti(path: Path, slices: int = 10, size: tuple[int, int] = (20, 18), seed: int = 0) -> Path:
    """A synthetic CT volume in HU, nibabel (x, y, z) order."""
    import nibabel as nib

    hu = np.random.default_rng(seed).normal(-600, 300, (*size, slices)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), path)
    return path
