"""DICOM through pydicom (+ pylibjpeg for compressed transfer syntaxes): single files and series.

Pixels are rescaled to HU with RescaleSlope/RescaleIntercept, which are validated first: a missing
value means the identity, a non-numeric, zero or non-finite one is refused naming the file (a NaN
slope would turn a whole scan into NaN). A series is ordered by position along the slice normal
(ImagePositionPatient . normal, else SliceLocation), never by file name.

**One series per folder.** A folder that mixes several SeriesInstanceUIDs is refused with the UIDs
named, because which series carries a label (or a verdict) is the user's decision, not a guess:
move each series into its own folder, or call :func:`group_dicom_series` (which a study upload
uses) to list the series with their tags and pick one, e.g. the axial CT. Non-image objects in a
series folder (DICOMDIR, reports) are ignored with a warning.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from covidscan.config import ReadLimits
from covidscan.data.readers.base import (
    SKIP_HINT,
    Header,
    LimitError,
    NonFiniteError,
    NoPixelDataError,
    Reader,
    check_header,
    check_path,
)
from covidscan.data.records import DataError, DataWarning
from covidscan.notices import fold_dicom_notices

logger = logging.getLogger(__name__)

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})


def is_dicom_file(path: Path) -> bool:
    """``*.dcm`` / ``*.dicom``, or an extensionless file with the DICOM Part 10 magic (common in exports)."""
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return path.is_file()
    if path.suffix or not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomHeader:
    """The tags covidscan uses from one DICOM object, parsed and validated."""

    path: Path
    rows: int
    columns: int
    frames: int
    position: float | None  # along the slice normal, from ImagePositionPatient or SliceLocation
    orientation: tuple[float, ...] | None
    spacing: tuple[float, float] | None  # (row, column) mm
    thickness: float | None
    modality: str | None
    slope: float
    intercept: float
    series_uid: str | None
    study_uid: str | None
    series_number: int | None
    image_type: tuple[str, ...]
    description: str
    patient_id: str | None

    @property
    def is_image(self) -> bool:
        return self.rows > 0 and self.columns > 0


def read_dicom_header(path: Path, *, require_image: bool = True) -> DicomHeader:
    """Parse one object's header (pixels are not read)."""
    ds = _dcmread(path, pixels=False)
    header = _parse(path, ds)
    if require_image and not header.is_image:
        raise NoPixelDataError(
            f"{path}: DICOM has no pixel data (a report or structured object?); remove it from the dataset "
            "or pass --skip-bad"
        )
    if require_image and header.frames > 1:
        raise DataError(
            f"{path}: multi-frame DICOM ({header.frames} frames) is not supported; export the series as one "
            "file per slice"
        )
    return header


def decode_dicom(path: Path, header: DicomHeader | None = None) -> np.ndarray:
    """One slice in HU, float32 (H, W)."""
    ds = _dcmread(path, pixels=True)
    header = header or _parse(path, ds)
    if "PixelData" not in ds:
        raise NoPixelDataError(
            f"{path}: DICOM has no pixel data (a report or structured object?); remove it from the dataset "
            "or pass --skip-bad"
        )
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing/broken codecs
        raise DataError(
            f"{path}: cannot decode DICOM pixels (transfer syntax "
            f"{getattr(ds.file_meta, 'TransferSyntaxUID', '?')}): {exc}. Compressed CT needs "
            "pylibjpeg + pylibjpeg-libjpeg (installed with covidscan)"
        ) from exc
    if raw.ndim == 3 and ds.get("SamplesPerPixel", 1) == 3:
        raw = raw.mean(axis=-1)
    if raw.ndim != 2:
        raise DataError(f"{path}: expected a single-frame 2D DICOM, got pixel array shape {raw.shape}")
    return raw.astype(np.float32) * np.float32(header.slope) + np.float32(header.intercept)


def _dcmread(path: Path, *, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    fold_dicom_notices()  # for Python-API users and scripts too, not only the CLI
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({exc}); {SKIP_HINT}") from exc


def _number(path: Path, ds, keyword: str, default: float | None, *, strict: bool = True) -> float | None:
    """A numeric tag, refused by name when it is not a finite number (never a bare float() error);
    ``strict=False`` for informative tags: a bad value then reads as missing."""
    value = ds.get(keyword)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        if not strict:
            return default
        raise DataError(
            f"{path}: {keyword} {str(value)!r} is not a number; fix the DICOM header or remove the file"
        ) from None
    if not math.isfinite(number):
        if not strict:
            return default
        raise NonFiniteError(f"{path}: {keyword} is {number}; fix the DICOM header or remove the file")
    return number


def _required(path: Path, ds, keyword: str, default: float) -> float:
    value = _number(path, ds, keyword, default)
    return default if value is None else value


def _numbers(path: Path, ds, keyword: str, count: int, *, strict: bool = True) -> tuple[float, ...] | None:
    values = ds.get(keyword)
    if values is None or values == "":
        return None
    try:
        numbers = tuple(
            float(v) for v in (values if isinstance(values, Sequence) and not isinstance(values, str) else [values])
        )
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        if not strict:
            return None
        raise DataError(f"{path}: {keyword} {str(values)!r} is not {count} finite numbers; fix the DICOM header")
    return numbers


def _parse(path: Path, ds) -> DicomHeader:
    """The header fields, validated. (pydicom logs and warns an invalid value on its own, folded to one
    notice per kind by :func:`~covidscan.notices.fold_dicom_notices`; the warnings filters are not swapped
    around a read here: they are process-wide, and the server reads in threads.)"""
    orientation = _numbers(path, ds, "ImageOrientationPatient", 6)
    position = None
    ipp = _numbers(path, ds, "ImagePositionPatient", 3)
    if ipp is not None and orientation is not None:  # robust to tilted series, unlike the raw z
        normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
        position = float(np.dot(normal, np.asarray(ipp)))
    else:
        position = _number(path, ds, "SliceLocation", None)
    slope = _required(path, ds, "RescaleSlope", 1.0)
    if slope == 0:
        raise DataError(f"{path}: RescaleSlope is 0 (every pixel would be the intercept); fix the DICOM header")
    image_type = ds.get("ImageType") or ()
    series_number = _number(path, ds, "SeriesNumber", None, strict=False)
    spacing = _numbers(path, ds, "PixelSpacing", 2, strict=False)
    return DicomHeader(
        path=path,
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        frames=int(_number(path, ds, "NumberOfFrames", 1) or 1),
        position=position,
        orientation=orientation,
        spacing=(spacing[0], spacing[1]) if spacing else None,
        thickness=_number(path, ds, "SliceThickness", None, strict=False),
        modality=ds.get("Modality") or None,
        slope=slope,
        intercept=_required(path, ds, "RescaleIntercept", 0.0),
        series_uid=str(ds.get("SeriesInstanceUID") or "") or None,
        study_uid=str(ds.get("StudyInstanceUID") or "") or None,
        series_number=int(series_number) if series_number is not None else None,
        image_type=tuple(str(v) for v in ([image_type] if isinstance(image_type, str) else image_type)),
        description=str(ds.get("SeriesDescription") or ""),
        patient_id=str(ds.get("PatientID") or "") or None,
    )


class DicomFileReader(Reader):
    """One single-frame DICOM file (CT slice), in HU."""

    name = "dicom"

    def verify_suffix(self, path: Path) -> bool:
        return is_dicom_file(path)

    def read_header(self, path: Path, limits: ReadLimits) -> Header:
        header = read_dicom_header(path)
        return Header((1, header.rows, header.columns), is_hu=True, mode="DICOM")

    def decode(self, path: Path, header: Header, limits: ReadLimits) -> np.ndarray:
        return decode_dicom(path)[None]


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder``, in name order."""
    return sorted(p for p in folder.iterdir() if is_dicom_file(p))


class DicomSeriesReader(Reader):
    """A folder holding one DICOM series (one scan), as an HU volume sorted by slice position."""

    name = "dicom-series"
    volumetric = True

    def __init__(self, allowed_modalities: tuple[str, ...] = ("CT",)) -> None:
        self.allowed_modalities = allowed_modalities

    def verify_suffix(self, path: Path) -> bool:
        return path.is_dir() and any(is_dicom_file(p) for p in path.iterdir())

    def read_header(self, path: Path, limits: ReadLimits) -> Header:
        return series_header(dicom_files(path), path, limits, self.allowed_modalities)

    def decode(self, path: Path, header: Header, limits: ReadLimits) -> np.ndarray:
        return decode_series(header)

    def decode_slice(self, path: Path, header: Header, index: int, limits: ReadLimits) -> np.ndarray:
        return _series_slice(header, index)


def decode_series(header: Header) -> np.ndarray:
    """The slices of a validated series (:func:`series_header`) in HU, decoded straight into one
    preallocated volume, so peak memory is about the volume itself rather than twice it."""
    hu = np.empty(header.shape, np.float32)
    for index in range(header.shape[0]):
        hu[index] = _series_slice(header, index)
    return hu


def _series_slice(header: Header, index: int) -> np.ndarray:
    file = header.files[index]
    image = decode_dicom(file)
    if image.shape != header.shape[1:]:
        raise DataError(f"{file}: slice size {image.shape} differs from the series' {header.shape[1:]}; not one series")
    return image


def series_header(
    files: Sequence[Path], label: Path | str, limits: ReadLimits, allowed_modalities: tuple[str, ...] = ("CT",)
) -> Header:
    """Validate a series from its headers alone: one SeriesInstanceUID, allowed modality, one
    orientation, known and distinct slice positions. ``label`` names it in messages (its folder)."""
    if not files:
        raise DataError(f"{label}: no DICOM files (*.dcm) in this series folder")
    if len(files) > limits.max_slices:
        raise LimitError(
            f"{label}: {len(files)} DICOM files exceed the {limits.max_slices} slice limit (data.limits.max_slices); "
            "raise the limit if the series is genuine"
        )
    headers = []
    for file in files:
        check_path(file, limits)
        headers.append(read_dicom_header(file, require_image=False))
    images = [h for h in headers if h.is_image]
    if len(images) < len(headers):
        logger.warning("%s: ignored %d DICOM object(s) without an image", label, len(headers) - len(images))
    if not images:
        raise NoPixelDataError(f"{label}: no DICOM image in this series folder (only reports or other objects)")
    uids = Counter(h.series_uid for h in images)
    if len(uids) > 1:
        listed = ", ".join(f"{uid or '(none)'} ({count} files)" for uid, count in uids.most_common())
        raise DataError(
            f"{label}: {len(uids)} DICOM series in one folder (SeriesInstanceUID {listed}); covidscan reads one "
            "series per folder: move each series into its own folder (covidscan.data.group_dicom_series lists them)"
        )
    multiframe = next((h for h in images if h.frames > 1), None)
    if multiframe is not None:
        raise DataError(f"{multiframe.path}: multi-frame DICOM ({multiframe.frames} frames) is not supported here")
    modalities = {h.modality for h in images if h.modality}
    bad = modalities - set(allowed_modalities)
    if allowed_modalities and bad:
        raise DataError(
            f"{label}: modality {sorted(bad)} is not {list(allowed_modalities)}; covidscan volumes expect CT series"
        )
    orientations = {tuple(round(v, 3) for v in h.orientation) for h in images if h.orientation}
    if len(orientations) > 1:
        raise DataError(
            f"{label}: slices have {len(orientations)} different orientations; split the "
            "folder into one series per orientation"
        )
    missing = next((h for h in images if h.position is None), None)
    if missing is not None:
        raise DataError(f"{missing.path}: no ImagePositionPatient or SliceLocation; cannot order the series")
    images.sort(key=lambda h: cast(float, h.position))  # None was refused above
    gaps = np.diff([h.position for h in images])
    if len(gaps) and np.any(np.isclose(gaps, 0)):
        raise DataError(f"{label}: two slices share one position; duplicated files or two series in one folder")
    z = float(np.median(np.abs(gaps))) if len(gaps) else (images[0].thickness or 1.0)
    if len(gaps) > 2 and np.max(np.abs(gaps)) > 1.5 * z + 1e-3:
        warnings.warn(
            f"{label}: uneven slice spacing (median {z:.2f} mm, max {np.max(np.abs(gaps)):.2f} mm): "
            "slices may be missing",
            DataWarning,
            stacklevel=2,
        )
    first = images[0]
    for h in images:  # every slice within the limits, not just the first (mixed sizes are found when decoding)
        if (h.rows, h.columns) != (first.rows, first.columns):
            check_header(h.path, Header((1, h.rows, h.columns), True), limits)
    return Header(
        (len(images), first.rows, first.columns),
        is_hu=True,
        spacing=(z, *first.spacing) if first.spacing else None,
        mode="DICOM series",
        files=tuple(h.path for h in images),
    )


# ---- studies: several series, described by their tags ---------------------------------------------
@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study, described by its tags, so a caller can pick e.g. the axial CT."""

    series_uid: str | None
    study_uid: str | None
    modality: str | None
    image_type: tuple[str, ...]  # e.g. ("ORIGINAL", "PRIMARY", "AXIAL"); ("DERIVED", "SECONDARY", ...) for reformats
    description: str  # SeriesDescription
    series_number: int | None
    patient_id: str | None
    files: tuple[Path, ...]  # image files, in slice order when positions are known, else name order
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row and column direction cosines)
    plane: str  # axial / coronal / sagittal / oblique / mixed / unknown
    rows: int
    columns: int
    other_files: tuple[Path, ...] = ()  # objects of the series without an image (reports, ...)

    @property
    def num_slices(self) -> int:
        return len(self.files)

    @property
    def is_axial_ct(self) -> bool:
        return self.modality == "CT" and self.plane == "axial" and self.num_slices > 0

    def to_dict(self) -> dict[str, object]:
        return {
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "modality": self.modality,
            "image_type": list(self.image_type),
            "description": self.description,
            "series_number": self.series_number,
            "patient_id": self.patient_id,
            "num_slices": self.num_slices,
            "plane": self.plane,
            "orientation": list(self.orientation) if self.orientation else None,
            "rows": self.rows,
            "columns": self.columns,
        }


def series_plane(orientations: set[tuple[float, ...]]) -> str:
    """The plane of a series from its slices' ImageOrientationPatient values (rounded): axial /
    coronal / sagittal / oblique, ``mixed`` for several, ``unknown`` for none."""
    if not orientations:
        return "unknown"
    if len(orientations) > 1:
        return "mixed"
    cosines = next(iter(orientations))
    normal = np.abs(np.cross(np.asarray(cosines[:3]), np.asarray(cosines[3:])))
    axis = int(np.argmax(normal))
    if normal[axis] < 0.9:  # more than ~25 degrees off every patient axis
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _study_files(files: Iterable[str | Path] | str | Path) -> list[Path]:
    if isinstance(files, str | Path):
        root = Path(files)
        if not root.is_dir():
            return [root]
        return sorted(p for p in root.rglob("*") if is_dicom_file(p))
    return [Path(f) for f in files]


def group_dicom_series(
    files: Iterable[str | Path] | str | Path, *, limits: ReadLimits | None = None, skip_bad: bool = False
) -> list[SeriesInfo]:
    """Group DICOM files (or every DICOM file under a folder) by SeriesInstanceUID, reading headers only.

    Series come sorted by study, SeriesNumber and UID; each lists its image files in slice order.
    A file that is not readable DICOM is a :class:`DataError` (or, with ``skip_bad``, logged and left out).
    """
    limits = limits or ReadLimits()
    paths = _study_files(files)
    if len(paths) > limits.max_slices * 8:
        raise LimitError(
            f"{len(paths)} DICOM files in one study exceed {limits.max_slices * 8} (8 x data.limits.max_slices)"
        )
    groups: dict[str | None, list[DicomHeader]] = defaultdict(list)
    for path in paths:
        try:
            check_path(path, limits)
            header = read_dicom_header(path, require_image=False)
        except DataError as exc:
            if not skip_bad:
                raise
            logger.warning("skipped %s", exc)
            continue
        groups[header.series_uid].append(header)
    series = []
    for uid, headers in groups.items():
        images = [h for h in headers if h.is_image]
        ordered = (
            sorted(images, key=lambda h: cast(float, h.position))
            if images and all(h.position is not None for h in images)
            else sorted(images, key=lambda h: h.path.name)
        )
        first = ordered[0] if ordered else headers[0]
        orientations = {tuple(round(v, 3) for v in h.orientation) for h in images if h.orientation}
        series.append(
            SeriesInfo(
                series_uid=uid,
                study_uid=first.study_uid,
                modality=first.modality,
                image_type=first.image_type,
                description=first.description,
                series_number=first.series_number,
                patient_id=first.patient_id,
                files=tuple(h.path for h in ordered),
                orientation=first.orientation,
                plane=series_plane(orientations),
                rows=first.rows,
                columns=first.columns,
                other_files=tuple(h.path for h in headers if not h.is_image),
            )
        )
    return sorted(series, key=lambda s: (s.study_uid or "", s.series_number or 0, s.series_uid or ""))
