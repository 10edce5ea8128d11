"""The reader contract and registry: one class per file format, chosen by what a path looks like.

Modelled on MONAI's ``ImageReader`` + ``LoadImage.register``: a reader says which paths it accepts
(``verify_suffix``), and the registry asks the most recently registered reader first, so a user's
reader can take over a format. MONAI's readers themselves are not used because the project's
contract differs from theirs: CT comes out in HU and 2D images in [0, 1] (not channel-first
MetaTensors), every format must enforce the same :class:`~covidscan.config.ReadLimits` on its
header *before* decoding, and every failure must be one :class:`DataError` naming the file.

A reader implements three steps; :meth:`Reader.header` and :meth:`Reader.read` wrap them with the
checks every format shares (path, file size, declared size, finite pixels), so a new format gets
them without repeating them:

- ``read_header(path, limits)``: shape ``(D, H, W)`` (``D = 1`` for a 2D image), spacing, whether
  the values are HU, without decoding pixels;
- ``decode(path, header, limits)``: float32 ``(D, H, W)``;
- optionally ``decode_slice`` (one slice cheaply) and ``preview`` (a small 2D view for hashing).
"""

from __future__ import annotations

import errno
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from covidscan.config import ReadLimits, WindowConfig
from covidscan.data.records import DataError

LUNG_WINDOW = WindowConfig(level=-600.0, width=1500.0)
SKIP_HINT = "replace or remove the file, or pass --skip-bad (data.skip_bad: true) to skip it"


class LimitError(DataError):
    """The input declares more than :class:`ReadLimits` allows (the HTTP API answers 413)."""


class NoPixelDataError(DataError):
    """A DICOM object without an image (a report, a presentation state, a DICOMDIR)."""


class NonFiniteError(DataError):
    """NaN or infinite pixel values, or a rescale that would produce them."""


@dataclass(frozen=True)
class Header:
    """What a reader learns without decoding pixels."""

    shape: tuple[int, int, int]  # (D, H, W); D = 1 for a 2D image
    is_hu: bool  # CT values in Hounsfield units (windowed for display), else already in [0, 1]
    spacing: tuple[float, float, float] | None = None  # (z, y, x) mm
    mode: str = ""  # e.g. PIL's "L" / "RGB", "DICOM", "NIfTI": reported by the audit
    files: tuple[Path, ...] = ()  # the files behind a multi-file input (a series), in slice order


@dataclass
class Pixels:
    """A decoded input: float32 ``(D, H, W)``, HU when ``is_hu`` else in [0, 1]."""

    array: np.ndarray
    is_hu: bool
    spacing: tuple[float, float, float] | None = None


def apply_window(hu: np.ndarray, window: WindowConfig = LUNG_WINDOW) -> np.ndarray:
    """Map HU to [0, 1] with a CT window (level/width), clipping outside it."""
    low = window.level - window.width / 2
    return np.clip((hu.astype(np.float32) - low) / window.width, 0.0, 1.0)


class Reader(ABC):
    """One file format. Subclasses implement ``verify_suffix``, ``read_header`` and ``decode``."""

    name: ClassVar[str] = ""
    volumetric: ClassVar[bool] = False  # reads a whole scan (``read_volume``), not one 2D image

    @abstractmethod
    def verify_suffix(self, path: Path) -> bool:
        """Whether this reader takes ``path``, judged from its name (and, for folders, their files)."""

    @abstractmethod
    def read_header(self, path: Path, limits: ReadLimits) -> Header:
        """Shape, spacing and units from the header alone; raise :class:`DataError` on a bad header."""

    @abstractmethod
    def decode(self, path: Path, header: Header, limits: ReadLimits) -> np.ndarray:
        """The pixels, float32 ``(D, H, W)``, HU or [0, 1] as the header says."""

    def read_checked(self, path: Path, limits: ReadLimits) -> tuple[Header, np.ndarray]:
        """Header, limit check (:func:`check_header`), then decoding. A format that can do all three
        from one opening of the file overrides this (Pillow does), keeping the check before decoding."""
        header = self.read_header(path, limits)
        check_header(path, header, limits)
        return header, self.decode(path, header, limits)

    def decode_slice(self, path: Path, header: Header, index: int, limits: ReadLimits) -> np.ndarray:
        """One ``(H, W)`` slice; formats that can read a slice alone override this."""
        return self.decode(path, header, limits)[index]

    def preview(self, path: Path, header: Header, limits: ReadLimits, size: int) -> np.ndarray:
        """A 2D view in [0, 1] for fingerprinting (the middle slice, lung-windowed when in HU).
        ``size`` is a hint: formats that can decode at a reduced scale (JPEG) may do so."""
        middle = check_finite(path, self.decode_slice(path, header, header.shape[0] // 2, limits))
        return apply_window(middle) if header.is_hu else middle

    # ---- the checks every format shares; not meant to be overridden ----------------------------
    def header(self, path: str | Path, limits: ReadLimits | None = None) -> Header:
        """The validated header: the path is readable and within the limits, and so is what it declares."""
        path, limits = Path(path), limits or ReadLimits()
        check_path(path, limits)
        header = self._guarded(path, lambda: self.read_header(path, limits))
        check_header(path, header, limits)
        return header

    def read(self, path: str | Path, limits: ReadLimits | None = None) -> Pixels:
        """Header checks, then decoding, then a finite check of the result."""
        path, limits = Path(path), limits or ReadLimits()
        check_path(path, limits)
        header, array = self._guarded(path, lambda: self.read_checked(path, limits))
        if array.shape != header.shape:
            raise DataError(
                f"{path}: decoded shape {array.shape} differs from the declared {header.shape}; {SKIP_HINT}"
            )
        return Pixels(check_finite(path, array), header.is_hu, header.spacing)

    def read_slice(
        self, path: str | Path, index: int | None = None, limits: ReadLimits | None = None
    ) -> tuple[np.ndarray, Header]:
        """Slice ``index`` (default: the middle one), HU or [0, 1], and the header; only that slice is
        decoded where the format allows it."""
        path, limits = Path(path), limits or ReadLimits()
        header = self.header(path, limits)
        index = header.shape[0] // 2 if index is None else index
        pixels = self._guarded(path, lambda: self.decode_slice(path, header, index, limits))
        return check_finite(path, pixels), header

    def _guarded(self, path: Path, step):
        """Run a library call on untrusted bytes: whatever it raises becomes a DataError naming the file."""
        try:
            return step()
        except DataError:
            raise
        except MemoryError:
            raise LimitError(f"{path}: out of memory while reading; lower data.limits or {SKIP_HINT}") from None
        except Exception as exc:  # decoders raise many types (OSError, struct.error, zlib.error, ...) on bad bytes
            raise DataError(f"{path}: unreadable {self.name} file ({type(exc).__name__}: {exc}); {SKIP_HINT}") from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_path(path: Path, limits: ReadLimits) -> None:
    """A clear message for what ``open`` would report badly: loops, dangling links, permissions, size."""
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: symbolic link loop; point the link at a real file or remove it") from None
        if path.is_symlink():
            raise DataError(f"{path}: broken symbolic link (to {os.readlink(path)}); fix or remove the link") from None
        if exc.errno == errno.EACCES:
            raise DataError(f"{path}: permission denied; make it readable (chmod) or remove it") from None
        raise DataError(f"{path}: file not found; fix the path or remove it from the manifest") from None
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: permission denied; make it readable (chmod) or remove it")
    if not stat.S_ISREG(info.st_mode):
        return
    if info.st_size > limits.max_file_bytes:
        raise LimitError(
            f"{path}: {info.st_size / 2**20:.1f} MB exceeds the {limits.max_file_bytes / 2**20:.1f} MB file limit "
            "(data.limits.max_file_bytes); raise the limit if the file is genuine"
        )
    if info.st_size == 0:
        raise DataError(f"{path}: empty file; {SKIP_HINT}")


def check_header(path: Path, header: Header, limits: ReadLimits) -> None:
    """The declared size against the limits, before any pixel is decoded."""
    depth, height, width = header.shape
    if min(header.shape) < 1:
        raise DataError(f"{path}: declares an empty image {height}x{width} ({depth} slices); {SKIP_HINT}")
    problems = []
    if max(height, width) > limits.max_side:
        problems.append(f"{width}x{height} px exceeds the {limits.max_side} px limit per side (data.limits.max_side)")
    elif height * width > limits.max_pixels:
        problems.append(f"{width}x{height} px exceeds {limits.max_pixels:,} pixels (data.limits.max_pixels)")
    if depth > limits.max_slices:
        problems.append(f"{depth} slices exceed the {limits.max_slices} slice limit (data.limits.max_slices)")
    decoded = depth * height * width * 4
    if not problems and decoded > limits.max_decoded_bytes:
        problems.append(
            f"decoding needs {decoded / 2**30:.1f} GiB, more than {limits.max_decoded_bytes / 2**30:.1f} GiB "
            "(data.limits.max_decoded_bytes)"
        )
    if problems:
        raise LimitError(
            f"{path}: declared size {'; '.join(problems)} - a decompression bomb or an unusually large input; "
            "raise data.limits if it is genuine"
        )


def check_finite(path: Path, array: np.ndarray) -> np.ndarray:
    """Refuse NaN/inf pixels: a model fed NaN answers NaN probabilities with a confident-looking label."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise NonFiniteError(
            f"{path}: {bad} of {array.size} pixel values are NaN or infinite; fix the file (e.g. replace NaN "
            "by the background value) or remove it"
        )
    return array


# ---- the registry ------------------------------------------------------------------------------
_READERS: list[Reader] = []


def register_reader(reader: Reader | type[Reader]) -> Reader | type[Reader]:
    """Add a reader (an instance, or a class built without arguments); returns its argument, so
    ``@register_reader`` works on a class. Readers registered later are asked first."""
    instance = reader() if isinstance(reader, type) else reader
    if not isinstance(instance, Reader) or not instance.name:
        raise TypeError(f"{reader!r} is not a Reader with a name")
    if any(r.name == instance.name for r in _READERS):
        raise ValueError(f"a reader named {instance.name!r} is already registered; unregister_reader it first")
    _READERS.append(instance)
    return reader


def unregister_reader(name: str) -> None:
    _READERS[:] = [r for r in _READERS if r.name != name]


def list_readers() -> list[str]:
    """Registered reader names, in the order they are asked (last registered first)."""
    return [r.name for r in reversed(_READERS)]


def find_reader(path: str | Path, *, volumetric: bool | None = None) -> Reader | None:
    """The reader that takes ``path`` (optionally only scan or only 2D readers), or None."""
    path = Path(path)
    for reader in reversed(_READERS):
        if volumetric is not None and reader.volumetric != volumetric:
            continue
        try:
            if reader.verify_suffix(path):
                return reader
        except OSError:  # an unlistable folder or unreadable file is no format's; check_path names the cause
            continue
    return None


def get_reader(path: str | Path, *, volumetric: bool | None = None) -> Reader:
    """Like :func:`find_reader`, but a clear error (with the accepted formats) when none takes it."""
    reader = find_reader(path, volumetric=volumetric)
    if reader is not None:
        return reader
    path = Path(path)
    if not path.exists():
        check_path(path, ReadLimits())  # names loops, broken links, missing files
    kinds = "scan" if volumetric else "image" if volumetric is False else "input"
    accepted = [r.name for r in reversed(_READERS) if volumetric is None or r.volumetric == volumetric]
    raise DataError(f"{path}: unknown {kinds} type {path.suffix or '(folder)'!r}; readable formats: {accepted}")


def is_supported_file(path: str | Path) -> bool:
    """Whether some registered reader takes this file (folders are scans, see ``find_reader``)."""
    path = Path(path)
    return path.is_file() and find_reader(path) is not None
