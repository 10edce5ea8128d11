"""Reading pixels, whatever the format: the public facades over the reader registry.

``read_image`` gives the 2D contract (grayscale float32 ``(H, W)`` in [0, 1]; CT windowed) and
``read_volume`` the 3D one (HU ``(D, H, W)`` plus spacing). Both pick the reader for the path from
:mod:`covidscan.data.readers`, which checks :class:`~covidscan.config.ReadLimits` on the header
before decoding and refuses non-finite pixels; a new format is registered there, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidscan.config import ReadLimits, WindowConfig
from covidscan.data.readers import (
    LUNG_WINDOW,
    DicomFileReader,
    DicomSeriesReader,
    apply_window,
    get_reader,
    is_nifti,
    is_supported_file,
)
from covidscan.data.readers.base import check_finite, check_header
from covidscan.data.readers.dicom import DICOM_EXTENSIONS, decode_series, read_dicom_header, series_header
from covidscan.data.readers.image import IMAGE_EXTENSIONS
from covidscan.data.readers.nifti import NiftiReader
from covidscan.data.records import DataError

__all__ = [
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "LUNG_WINDOW",
    "DicomSlice",
    "Volume",
    "apply_window",
    "is_nifti",
    "is_supported_file",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "read_middle_slice",
    "read_nifti",
    "read_volume",
]


def read_image(path: str | Path, window: WindowConfig | None = None, *, limits: ReadLimits | None = None) -> np.ndarray:
    """Read one 2D image as grayscale float32 in [0, 1], shape (H, W).

    DICOM and NIfTI are windowed (lung window unless ``window`` says otherwise); a NIfTI or
    multi-slice input must be 2D here: volumes go through :func:`read_volume`.
    """
    path = Path(path)
    reader = get_reader(path)
    if reader.volumetric and path.is_dir():
        raise DataError(f"{path}: a scan folder given where a 2D image was expected; use a 3D (spatial_dims: 3) config")
    pixels = reader.read(path, limits)
    if pixels.array.shape[0] != 1:
        raise DataError(
            f"{path}: volume with {pixels.array.shape[0]} slices given where a 2D image was expected; "
            "use a 3D (spatial_dims: 3) config for volumes"
        )
    return apply_window(pixels.array[0], window or LUNG_WINDOW) if pixels.is_hu else pixels.array[0]


@dataclass
class Volume:
    hu: np.ndarray  # float32 (D, H, W), slice order head-to-feet as sorted by position
    spacing: tuple[float, float, float] | None  # (z, y, x) mm
    source: str


def read_volume(path: str | Path, *, limits: ReadLimits | None = None) -> Volume:
    """A CT volume in HU from a DICOM series folder or a NIfTI file (any registered scan reader)."""
    path = Path(path)
    reader = get_reader(path, volumetric=True) if path.exists() else None
    if reader is None:
        raise DataError(f"{path}: a volume must be a DICOM series folder or a .nii/.nii.gz file")
    pixels = reader.read(path, limits)
    return Volume(pixels.array, pixels.spacing, str(path))


@dataclass
class DicomSlice:
    pixels: np.ndarray  # HU (after RescaleSlope/Intercept), float32 (H, W)
    position: float | None  # z along the slice normal, from ImagePositionPatient or SliceLocation
    modality: str | None
    spacing: tuple[float, float] | None  # (row, column) mm
    thickness: float | None
    orientation: tuple[float, ...] | None


def read_dicom(path: str | Path, *, pixels: bool = True, limits: ReadLimits | None = None) -> DicomSlice:
    """One DICOM file in HU, with the header fields a series needs; ``pixels=False`` reads the header only."""
    path = Path(path)
    array = DicomFileReader().read(path, limits).array[0] if pixels else np.zeros((0, 0), np.float32)
    header = read_dicom_header(path, require_image=pixels)
    return DicomSlice(
        pixels=array,
        position=header.position,
        modality=header.modality,
        spacing=header.spacing,
        thickness=header.thickness,
        orientation=header.orientation,
    )


def read_dicom_series(
    folder: str | Path | Sequence[str | Path],
    *,
    allowed_modalities: tuple[str, ...] = ("CT",),
    pixels: bool = True,
    limits: ReadLimits | None = None,
) -> Volume:
    """One series, sorted by slice position, in HU: a folder holding it, or its files (e.g. a
    :class:`~covidscan.data.readers.SeriesInfo`'s ``files`` from :func:`group_dicom_series`).

    Headers are read and validated first (one SeriesInstanceUID, modality, orientation, positions,
    limits), then slices are decoded straight into one preallocated (D, H, W) array.
    ``pixels=False`` stops after the headers (``hu`` has shape (D, 0, 0)): it validates the series
    and gives its slice count and spacing cheaply, e.g. to index slice stacks before decoding.
    """
    limits = limits or ReadLimits()
    if isinstance(folder, str | Path):
        reader = DicomSeriesReader(allowed_modalities)
        if pixels:
            volume = reader.read(folder, limits)
            return Volume(volume.array, volume.spacing, str(folder))
        header = reader.header(folder, limits)
        return Volume(np.zeros((header.shape[0], 0, 0), np.float32), header.spacing, str(folder))
    files = [Path(f) for f in folder]
    label = Path(files[0].parent if files else "(no files)")
    header = series_header(files, label, limits, allowed_modalities)
    check_header(label, header, limits)
    hu = check_finite(label, decode_series(header)) if pixels else np.zeros((header.shape[0], 0, 0), np.float32)
    return Volume(hu, header.spacing, str(label))


def read_nifti(path: str | Path, *, limits: ReadLimits | None = None) -> np.ndarray:
    """A NIfTI volume as float32 (D, H, W): nibabel's (x, y, z) moved to slices-first."""
    return NiftiReader().read(path, limits).array


def read_middle_slice(path: str | Path, *, limits: ReadLimits | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The middle slice (HU) of a scan and the scan's (D, H, W), decoding only that slice: enough to
    fingerprint a scan (``data audit``) without reading it all."""
    path = Path(path)
    reader = get_reader(path, volumetric=True) if path.exists() else None
    if reader is None:
        raise DataError(f"{path}: a volume must be a DICOM series folder or a .nii/.nii.gz file")
    middle, header = reader.read_slice(path, None, limits)
    return middle, header.shape
