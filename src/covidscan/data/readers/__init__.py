"""File-format readers and their registry (see :mod:`covidscan.data.readers.base`).

Built in, asked in this order: ``nifti`` (``.nii``/``.nii.gz``), ``dicom-series`` (a folder of
DICOM files), ``dicom`` (one ``.dcm``/``.dicom`` or extensionless DICOM file), ``image`` (PNG,
JPEG, BMP, TIFF via Pillow). A new format is one :class:`Reader` subclass plus one
:func:`register_reader` call; everything that lists, reads, audits or serves files then takes it.
"""

from covidscan.config import ReadLimits
from covidscan.data.readers.base import (
    LUNG_WINDOW,
    Header,
    LimitError,
    NonFiniteError,
    NoPixelDataError,
    Pixels,
    Reader,
    apply_window,
    find_reader,
    get_reader,
    is_supported_file,
    list_readers,
    register_reader,
    unregister_reader,
)
from covidscan.data.readers.dicom import (
    DicomFileReader,
    DicomSeriesReader,
    SeriesInfo,
    group_dicom_series,
    is_dicom_file,
)
from covidscan.data.readers.image import PILReader
from covidscan.data.readers.nifti import NiftiReader, is_nifti

for _builtin in (PILReader, DicomFileReader, DicomSeriesReader, NiftiReader):
    if _builtin.name not in list_readers():  # a module reload must not register twice
        register_reader(_builtin)

__all__ = [
    "LUNG_WINDOW",
    "DicomFileReader",
    "DicomSeriesReader",
    "Header",
    "LimitError",
    "NiftiReader",
    "NoPixelDataError",
    "NonFiniteError",
    "PILReader",
    "Pixels",
    "ReadLimits",
    "Reader",
    "SeriesInfo",
    "apply_window",
    "find_reader",
    "get_reader",
    "group_dicom_series",
    "is_dicom_file",
    "is_nifti",
    "is_supported_file",
    "list_readers",
    "register_reader",
    "unregister_reader",
]
