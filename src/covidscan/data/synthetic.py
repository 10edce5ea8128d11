"""Write synthetic CT DICOM series, for tests and benchmarks that must not depend on real scans.

Files are uncompressed (Explicit VR Little Endian) 16-bit CT slices with a real
RescaleSlope/RescaleIntercept and ImagePositionPatient, so HU rescale and slice ordering are
exercised exactly as with scanner output.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_dicom_slice(
    path: str | Path,
    hu: np.ndarray | None,
    position_z: float,
    *,
    spacing: tuple[float, float] = (0.7, 0.7),
    thickness: float = 2.5,
    intercept: float = -1024.0,
    slope: float = 1.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    instance_number: int = 1,
) -> Path:
    """One CT slice; ``hu=None`` writes a header-only object (no PixelData). It carries the patient,
    study and series identifiers a PACS needs to store it (a synthetic patient)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID, ds.PatientName = "SYNTHETIC-001", "Synthetic^Patient"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, instance_number
    ds.Modality = "CT"
    ds.ImagePositionPatient = [0.0, 0.0, float(position_z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = float(position_z)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = thickness
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    if hu is not None:
        stored = np.round((np.asarray(hu, dtype=np.float64) - intercept) / slope)
        if stored.min() < 0 or stored.max() > 65535:
            raise ValueError("HU values do not fit 16-bit unsigned storage with this slope/intercept")
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = stored.astype("<u2").tobytes()
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(
    folder: str | Path,
    hu: np.ndarray,
    *,
    slice_gap: float = 2.5,
    file_order: Sequence[int] | None = None,
    **slice_options,
) -> list[Path]:
    """Write a (D, H, W) HU volume as ``folder/slice_XXXX.dcm``; slice ``k`` sits at ``z = k * slice_gap``.

    ``file_order`` names slice ``k`` by its position in that permutation, so file-name order
    differs from anatomical order (as in many real exports).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = list(file_order) if file_order is not None else list(range(len(hu)))
    options = {"thickness": slice_gap, "series_uid": generate_uid(), "study_uid": generate_uid(), **slice_options}
    return [
        write_dicom_slice(folder / f"slice_{order[k]:04d}.dcm", hu[k], k * slice_gap, instance_number=k + 1, **options)
        for k in range(len(hu))
    ]
