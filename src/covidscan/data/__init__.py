"""Data layer: sources (folders, CSV manifests, DICOM, NIfTI), splits, leakage audit, datasets."""

from covidscan.data.audit import audit_samples, check_split_leakage
from covidscan.data.datasets import ImageDataset, build_dataset
from covidscan.data.io import (
    LUNG_WINDOW,
    Volume,
    apply_window,
    is_supported_file,
    read_dicom,
    read_dicom_series,
    read_image,
    read_nifti,
    read_volume,
)
from covidscan.data.readers import (
    Reader,
    ReadLimits,
    SeriesInfo,
    find_reader,
    group_dicom_series,
    list_readers,
    register_reader,
    unregister_reader,
)
from covidscan.data.records import DataError, DataIssue, DataWarning, Sample, SampleSet
from covidscan.data.sources import list_inputs, load_samples, parse_label_map, select_sources, source_label
from covidscan.data.splits import LeakageWarning, assign_splits, load_splits, save_splits, split_counts
from covidscan.data.transforms import NormStats, build_transform, fit_norm_stats, uses_dataset_stats

__all__ = [
    "LUNG_WINDOW",
    "DataError",
    "DataIssue",
    "DataWarning",
    "ImageDataset",
    "LeakageWarning",
    "NormStats",
    "ReadLimits",
    "Reader",
    "Sample",
    "SampleSet",
    "SeriesInfo",
    "Volume",
    "apply_window",
    "assign_splits",
    "audit_samples",
    "build_dataset",
    "build_transform",
    "check_split_leakage",
    "find_reader",
    "fit_norm_stats",
    "group_dicom_series",
    "is_supported_file",
    "list_inputs",
    "list_readers",
    "load_samples",
    "load_splits",
    "parse_label_map",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "read_volume",
    "register_reader",
    "save_splits",
    "select_sources",
    "source_label",
    "split_counts",
    "unregister_reader",
    "uses_dataset_stats",
]
