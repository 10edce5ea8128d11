"""Turn untrusted uploaded bytes into a (H, W) [0, 1] image, or a precise 4xx error.

Checks run cheapest first: size, declared content type, magic bytes, then the *declared* pixel
dimensions read from the header, so a decompression bomb is refused before any pixel is decoded.
Decoding itself goes through :func:`covidscan.data.read_image`, the same code (and CT window) as
training.
"""

from __future__ import annotations

import io
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from covidscan.config import WindowConfig
from covidscan.data import DataError, read_image
from covidscan.errors import UsageError

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
    width, height = _declared_size(data, fmt, filename)
    if max(width, height) > limits.max_pixels:
        raise UploadError(
            413, "image_too_large", f"{filename}: {width}x{height} px exceeds the {limits.max_pixels} px limit per side"
        )
    with tempfile.TemporaryDirectory(prefix="covidscan-upload-") as folder:
        path = Path(folder) / f"upload{SUFFIXES[fmt]}"
        path.write_bytes(data)
        try:
            pixels = read_image(path, window)
        except DataError as exc:
            raise UploadError(422, "corrupt_image", str(exc).replace(str(path), filename)) from None
    return DecodedImage(pixels, fmt)


def _declared_size(data: bytes, fmt: str, filename: str) -> tuple[int, int]:
    """(width, height) from the header only; a header that cannot be parsed is a corrupt upload."""
    if fmt == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), defer_size=1024)  # large elements (pixels) stay unread
        except Exception as exc:  # pydicom raises many types on broken headers
            raise UploadError(422, "corrupt_image", f"{filename}: unreadable DICOM header ({exc})") from None
        if "PixelData" not in ds:
            raise UploadError(
                422,
                "dicom_without_pixels",
                f"{filename}: DICOM has no pixel data (a report or structured object?); upload an image slice",
            )
        _check_rescale(ds, filename)
        return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # lazy: parses the header, decodes nothing
                return image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, "image_too_large", f"{filename}: declared image size is too large") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on broken headers
        raise UploadError(422, "corrupt_image", f"{filename}: unreadable image header ({exc})") from None


def _check_rescale(ds, filename: str) -> None:
    """RescaleSlope / RescaleIntercept turn stored values into HU: a non-numeric or non-finite one
    would make every pixel NaN or the decoder fail, so it is refused from the header."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value is None or str(value).strip() == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise UploadError(
                422,
                "corrupt_image",
                f"{filename}: DICOM {keyword} {str(value)!r} is not a finite number, so pixels cannot be "
                "converted to HU; fix the header (e.g. RescaleSlope 1) or export the slice again",
            )


def to_png(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a [0, 1] image, e.g. a browser-viewable preview of a windowed DICOM."""
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
