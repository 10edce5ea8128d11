"""2D images through Pillow: PNG, JPEG, BMP, TIFF, as grayscale float32 in [0, 1].

``torchvision.io`` is not used because its decoders need the compiled extension (see
``covidscan.compat``). EXIF orientation is applied (``ImageOps.exif_transpose``), so the model sees
the picture the way a browser or viewer shows it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from covidscan.config import ReadLimits
from covidscan.data.readers.base import SKIP_HINT, Header, LimitError, NonFiniteError, Reader, check_header
from covidscan.data.records import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class PILReader(Reader):
    """One 2D image (the first frame of a multi-page TIFF)."""

    name = "image"
    suffixes = IMAGE_EXTENSIONS

    def verify_suffix(self, path: Path) -> bool:
        return path.suffix.lower() in self.suffixes

    def read_header(self, path: Path, limits: ReadLimits) -> Header:
        with _open(path, limits) as image:
            return _header(image)

    def decode(self, path: Path, header: Header, limits: ReadLimits) -> np.ndarray:
        with _open(path, limits) as image:
            return _to_gray(path, _loaded(path, image))[None]

    def read_checked(self, path: Path, limits: ReadLimits) -> tuple[Header, np.ndarray]:
        """One opening of the file: header, limits, then the pixels (opening twice is measurably slower)."""
        with _open(path, limits) as image:
            header = _header(image)
            check_header(path, header, limits)
            return header, _to_gray(path, _loaded(path, image))[None]

    def preview(self, path: Path, header: Header, limits: ReadLimits, size: int) -> np.ndarray:
        """JPEGs are decoded at a reduced scale (DCT scaling), which is all a perceptual hash needs."""
        with _open(path, limits) as image:
            image.draft("L", (size, size))
            return _to_gray(path, _loaded(path, image))


def _open(path: Path, limits: ReadLimits) -> Image.Image:
    """Open lazily (header only). Pillow's own decompression-bomb guard (an error above twice
    ``Image.MAX_IMAGE_PIXELS``) becomes a LimitError; its warning below that is left alone (the
    warnings filters are process-wide and the server reads in threads), ``data.limits`` refuses next."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise LimitError(
            f"{path}: declared image size is too large ({exc}); a decompression bomb or an unusually large image"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: unreadable or corrupt image ({exc}); {SKIP_HINT}") from exc


def _header(image: Image.Image) -> Header:
    width, height = image.size
    if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return Header((1, height, width), is_hu=False, mode=image.mode)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation known from the header, without decoding (Pillow's ``getexif`` on a PNG
    without an eXIf chunk before its pixels would decode the whole image first)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return int(image.getexif().get(0x0112) or 1)


def _loaded(path: Path, image: Image.Image) -> Image.Image:
    """Decode the pixels (a truncated or corrupt stream fails here) and apply the EXIF orientation."""
    orientation = _orientation(image)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc}); {SKIP_HINT}") from exc
    return ImageOps.exif_transpose(image) if orientation != 1 else image


def _to_gray(path: Path, image: Image.Image) -> np.ndarray:
    """float32 (H, W) in [0, 1]: 16-bit scaled by 65535, 32-bit integer by its maximum, float by its range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return np.clip(array / top, 0.0, 1.0)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if not np.isfinite(array).all():
            raise NonFiniteError(
                f"{path}: float image with {int(np.count_nonzero(~np.isfinite(array)))} NaN or infinite pixel "
                "values; fix the file (e.g. replace NaN by the background value) or remove it"
            )
        low = float(array.min())
        span = float(array.max()) - low or 1.0
        return (array - low) / span
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
