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


# ---- a corpus of bad inputs (data layer and API tests) ------------------------------------------
def bomb_png_bytes(side: int = 30000) -> bytes:
    """A tiny PNG whose header declares ``side`` x ``side`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def truncated_jpeg_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    """A JPEG cut in the middle of its pixel data: the header reads, the decode fails."""
    data = png_bytes(size, fmt="JPEG")
    return data[: len(data) // 2]


def write_nan_tiff(path: Path) -> Path:
    """A 32-bit float TIFF with NaN pixels."""
    pixels = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    pixels[3:6, 3:6] = np.nan
    Image.fromarray(pixels).save(path)  # float32 -> mode F
    return path


def write_dicom_with_slope(path: Path, slope_text: bytes) -> Path:
    """A CT slice whose RescaleSlope is the (8-byte, space-padded) text given, e.g. b"NaN" or b"abc"."""
    write_dicom_slice(path, np.zeros((8, 8)) - 1000.0, 0.0, slope=1.23456)
    data = path.read_bytes()
    assert data.count(b"1.23456 ") == 1
    path.write_bytes(data.replace(b"1.23456 ", slope_text.ljust(8)))
    return path


def write_exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A 48x24 (W x H) JPEG, bright in its left half, tagged EXIF orientation 6 (display rotated 90 degrees
    clockwise); returns the upright picture a viewer shows, (48, 24) as (H, W), in [0, 1]."""
    stored = np.zeros((24, 48), np.uint8)
    stored[:, :24] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    return np.rot90(stored, k=-1).astype(np.float32) / 255.0
