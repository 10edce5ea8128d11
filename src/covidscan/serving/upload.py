"""Turn untrusted uploaded bytes into a (H, W) [0, 1] image, or a precise 4xx error.

Checks run cheapest first: size, declared content type, magic bytes; then the file goes through
:func:`covidscan.data.read_image`, the same readers, read limits and CT window as training and
batch prediction: the reader checks the *declared* pixel dimensions on the header before any pixel
is decoded (a decompression bomb is refused cheaply) and refuses non-finite pixels.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from covidscan.config import ReadLimits, WindowConfig
from covidscan.data import DataError, read_image
from covidscan.data.readers import LimitError, NoPixelDataError
from covidscan.data.readers.base import SKIP_HINT
from covidscan.errors import UsageError
from covidscan.inference import Predictor

ACCEPTED_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "application/dicom",
        "application/octet-stream",
        "",
    }
)
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


class UploadError(Exception):
    """An upload the server refuses; becomes ``{"error": code, "detail": ...}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 8192  # longest side, checked on the header before decoding

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise UsageError(f"max upload size must be >= 1 byte, got {self.max_bytes}")
        if self.max_pixels < 16:
            raise UsageError(f"max image side must be >= 16 px, got {self.max_pixels}")

    def read_limits(self) -> ReadLimits:
        """The reader limits an upload is decoded under (the defaults, tightened to these)."""
        defaults = ReadLimits()
        return ReadLimits(
            max_file_bytes=min(self.max_bytes, defaults.max_file_bytes),
            max_side=min(self.max_pixels, defaults.max_side),
            max_pixels=min(self.max_pixels**2, defaults.max_pixels),
        )


# reader errors -> (HTTP status, error code); the first matching class wins. Non-finite pixels or
# rescale values are a corrupt image (422) like any other DataError.
_READ_ERRORS: tuple[tuple[type[DataError], int, str], ...] = (
    (LimitError, 413, "image_too_large"),
    (NoPixelDataError, 422, "dicom_without_pixels"),
    (DataError, 422, "corrupt_image"),
)


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32 (H, W) in [0, 1]
    format: str  # png | jpeg | dicom


def sniff_format(data: bytes) -> str | None:
    """Recognise PNG, JPEG and DICOM (Part 10, "DICM" after the 128-byte preamble) by magic bytes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def decode_upload(
    data: bytes,
    *,
    filename: str = "upload",
    content_type: str | None = None,
    limits: UploadLimits = UploadLimits(),
    window: WindowConfig | None = None,
) -> DecodedImage:
    """Validate and decode one uploaded file; raises :class:`UploadError` for anything unusable."""
    if not data:
        raise UploadError(400, "empty_upload", f"{filename}: the uploaded file is empty")
    if len(data) > limits.max_bytes:
        raise UploadError(
            413,
            "upload_too_large",
            f"{filename}: {len(data) / 2**20:.1f} MB exceeds the {limits.max_bytes / 2**20:.1f} MB limit",
        )
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in ACCEPTED_CONTENT_TYPES:
        raise UploadError(
            415,
            "unsupported_media_type",
            f"{filename}: content type {declared!r} is not accepted; send image/png, image/jpeg or application/dicom",
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise UploadError(415, "not_an_image", f"{filename}: not a PNG, JPEG or DICOM file (unrecognised bytes)")
    with tempfile.TemporaryDirectory(prefix="covidscan-upload-") as folder:
        path = Path(folder) / f"upload{SUFFIXES[fmt]}"
        path.write_bytes(data)
        try:
            pixels = read_image(path, window, limits=limits.read_limits())
        except DataError as exc:
            status, code = next((s, c) for kind, s, c in _READ_ERRORS if isinstance(exc, kind))
            detail = str(exc).replace(str(path), filename).replace(f"; {SKIP_HINT}", "; upload a valid image")
            if code == "dicom_without_pixels":
                detail = f"{filename}: DICOM has no pixel data (a report or structured object?); upload an image slice"
            raise UploadError(status, code, detail) from None
    return DecodedImage(pixels, fmt)


def to_png(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a [0, 1] image, e.g. a browser-viewable preview of a windowed DICOM."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def require_explainable(predictor: Predictor) -> None:
    """Grad-CAM needs the PyTorch model: 409 for an ONNX model served without its checkpoint."""
    if not predictor.explainable:
        raise UploadError(
            409,
            "explain_unavailable",
            "serving an ONNX model without its checkpoint; restart with --checkpoint for Grad-CAM",
        )
