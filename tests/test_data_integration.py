"""Real data beside the project (../shared/datasets): loading, DICOM decoding, grouped splits."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from covidscan.config import SplitConfig
from covidscan.data import assign_splits, load_samples, read_dicom, read_dicom_series, read_image, split_counts

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "folder, n_classes, with_patients, with_splits, images",
    [
        ("sarscov2-ct", 2, False, False, True),
        ("covid-ct", 2, False, False, True),
        ("covid-ct/metadata.csv", 2, True, False, True),
        ("covid-ct-md-sample", 3, True, False, False),  # one DICOM series folder per patient
        ("covid19-xray", 3, False, True, True),
    ],
)
def test_all_shared_datasets_load(shared_datasets, folder, n_classes, with_patients, with_splits, images):
    data = load_samples(shared_datasets / folder)
    assert len(data.class_names) == n_classes and min(data.class_counts().values()) > 0
    assert data.has_patients() == with_patients
    assert all(s.split for s in data.samples) == with_splits
    if images:
        image = read_image(data.samples[0].path)
        assert image.ndim == 2 and image.min() >= 0 and image.max() <= 1


def test_xray_predefined_split_is_kept_and_val_carved_from_train(shared_datasets):
    data = load_samples(shared_datasets / "covid19-xray")
    result = assign_splits(data, SplitConfig(method="auto"), seed=0)
    assert [s.path for s in result.samples if s.split == "test"] == [s.path for s in data.samples if s.split == "test"]
    assert split_counts(result)["val"] > 0


@pytest.mark.filterwarnings("ignore:.*uneven slice spacing")  # the sample kept every 4th file only
@pytest.mark.parametrize("series", ["COVID-19/P001", "CAP/cap001", "Normal/normal001"])
def test_real_jpeg_lossless_series_decode_to_hu_in_slice_order(shared_datasets, series):
    folder = shared_datasets / "covid-ct-md-sample" / series
    files = sorted(folder.glob("*.dcm"))
    positions = {f: read_dicom(f, pixels=False).position for f in files}
    by_position = sorted(files, key=positions.get)
    assert by_position != files, "file-name order should differ from anatomical order in this sample"
    z = np.array([positions[f] for f in by_position])
    assert np.all(np.diff(z) > 0), "slice positions must be strictly monotonic"

    volume = read_dicom_series(folder)
    assert volume.hu.shape == (len(files), 512, 512)
    np.testing.assert_array_equal(volume.hu[0], read_dicom(by_position[0]).pixels)
    np.testing.assert_array_equal(volume.hu[-1], read_dicom(by_position[-1]).pixels)
    air = np.percentile(volume.hu, 5)
    assert -1100 <= air <= -900, f"outside-body air should be about -1000 HU, got {air}"
    assert volume.hu.max() > 200  # bone
    assert volume.spacing is not None and volume.spacing[0] > 0


def test_covid_ct_patient_grouped_split_has_zero_overlap(shared_datasets):
    data = load_samples(shared_datasets / "covid-ct" / "metadata.csv")
    result = assign_splits(data, SplitConfig(method="grouped", ratios=[0.8, 0.1, 0.1]), seed=42)
    splits_of = defaultdict(set)
    for s in result.samples:
        splits_of[s.patient_id].add(s.split)
    assert len(splits_of) == 384
    assert all(len(names) == 1 for names in splits_of.values())
    counts = split_counts(result)
    assert counts["val"] > 0 and counts["test"] > 0
    for name in ("val", "test"):
        assert set(result.subset(name).class_counts().values()) != {0}
