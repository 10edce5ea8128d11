"""Data layer: sources (folders, CSV manifests, DICOM, NIfTI), splits, leakage audit, datasets."""

from covidscan.data.audit import audit_samples, check_split_leakage
from covidscan.data.datasets import ImageDataset, build_dataset
from covidscan.data.io import (
    LUNG_WINDOW,
    Volume,
    apply_window,
    read_dicom,
    read_dicom_series,
    read_image,
    read_nifti,
    read_volume,
)
from covidscan.data.records import DataError, Sample, SampleSet
from covidscan.data.sources import list_inputs, load_samples, parse_label_map
from covidscan.data.splits import LeakageWarning, assign_splits, load_splits, save_splits, split_counts
from covidscan.data.transforms import NormStats, build_transform, fit_norm_stats, uses_dataset_stats

__all__ = [
    "LUNG_WINDOW",
    "DataError",
    "ImageDataset",
    "LeakageWarning",
    "NormStats",
    "Sample",
    "SampleSet",
    "Volume",
    "apply_window",
    "assign_splits",
    "audit_samples",
    "build_dataset",
    "build_transform",
    "check_split_leakage",
    "fit_norm_stats",
    "list_inputs",
    "load_samples",
    "load_splits",
    "parse_label_map",
    "read_dicom",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "read_volume",
    "save_splits",
    "split_counts",
    "uses_dataset_stats",
]
