"""Volume datasets (study C): scans -> lazily decoded, preprocessed stacks of adjacent slices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import covidscan.data.volumes as volumes
from covidscan.config import AugmentConfig, ConfigError, DataConfig, VolumeConfig
from covidscan.data import DataError, Sample, build_dataset
from covidscan.data.volumes import VolumeStackDataset, lung_mask, scan_stacks, stack_starts

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    *,
    z_mm: float = 2.0,
    modality: str = "CT",
    orientations: list[tuple[float, ...]] | None = None,
    positions: list[float] | None = None,
) -> Path:
    """One CT series; file names run opposite to the slice order, as in real exports."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for index, plane in enumerate(hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = (
            CTImageStorage,
            meta.MediaStorageSOPInstanceUID,
            series_uid,
        )
        ds.Modality = modality
        ds.ImageOrientationPatient = list(orientations[index] if orientations else AXIAL)
        z = positions[index] if positions else index * z_mm
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], z_mm
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (plane + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{len(hu) - index:04d}.dcm", enforce_file_format=True)
    return folder


def ramp(slices: int, size: int = 24) -> np.ndarray:
    """HU volume whose slice k is uniformly -1000 + 100 k: slice order is visible in the values."""
    return np.stack([np.full((size, size), -1000.0 + 100 * k) for k in range(slices)])


def data_config(**changes) -> DataConfig:
    volume = changes.pop("volume", {})
    base = DataConfig(spatial_dims=3, depth=4, image_size=16, channels=1, normalize="none")
    return dataclasses.replace(base, volume=VolumeConfig(**volume), **changes)


def test_stack_starts_cover_every_slice() -> None:
    assert stack_starts(10, 4, 4) == [0, 4, 6]  # a last stack ends on the last slice
    assert stack_starts(8, 4, 4) == [0, 4]
    assert stack_starts(8, 4, 2) == [0, 2, 4]
    assert stack_starts(3, 4, 4) == [0]


def test_dicom_series_stacks_in_slice_order_inherit_label_and_patient(tmp_path: Path) -> None:
    series = write_dicom_series(tmp_path / "COVID" / "p1", ramp(10))
    dataset = build_dataset(
        data_config(channels=3), [Sample(str(series), "COVID", "p1")], ["COVID", "normal"], train=False
    )
    assert isinstance(dataset, VolumeStackDataset)
    assert len(dataset) == 3
    x, label = dataset[0]
    assert x.shape == (3, 4, 16, 16) and label == 0
    means = [float(dataset[i][0][0, d].mean()) for i in range(3) for d in range(4)]
    assert means[:4] == sorted(means[:4]) and means[4] < means[5]  # slices ascend by position, not file name
    assert [s.patient_id for s in dataset.item_samples] == ["p1"] * 3
    assert [s.path for s in dataset.item_samples] == [f"{series}#stack{k}" for k in range(3)]


def test_stacks_are_decoded_lazily_and_cached(tmp_path: Path, monkeypatch) -> None:
    scans = [Sample(str(write_dicom_series(tmp_path / name, ramp(8))), "COVID", name) for name in ("a", "b")]
    calls = []
    real = volumes.read_volume
    monkeypatch.setattr(volumes, "read_volume", lambda path, **kw: calls.append(path) or real(path, **kw))
    dataset = VolumeStackDataset(scans, ["COVID"], data_config(volume={"cache_scans": 1}), train=False)
    assert calls == []  # indexing reads headers only
    for index in range(len(dataset)):
        dataset[index]
    assert len(calls) == 2  # one decode per scan while streaming in order
    dataset[0], dataset[2], dataset[0]
    assert len(calls) == 5  # cache of one scan: alternating scans decode again


def test_nifti_and_z_resampling(tmp_path: Path) -> None:
    data = np.transpose(ramp(12, 20), (2, 1, 0)).astype(np.float32)  # nibabel order (x, y, z)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    sample = [Sample(str(path), "COVID")]
    assert len(VolumeStackDataset(sample, ["COVID"], data_config(), train=False)) == 3  # 12 slices: 0, 4, 8
    resampled = VolumeStackDataset(sample, ["COVID"], data_config(volume={"z_spacing": 4.0}), train=False)
    assert len(resampled) == 2  # 6 slices at 4 mm: 0, 2
    assert resampled.item_samples[0].patient_id == str(path)  # no patient id: the scan is its own patient


def test_slice_image_folder_uses_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    folder.mkdir()
    for k in range(12):
        Image.fromarray(np.full((20, 20), 20 * k, np.uint8)).save(folder / f"slice{k}.png")
    stacks = scan_stacks(folder, data_config())
    assert stacks.shape == (3, 1, 4, 16, 16)
    means = stacks[:, 0].mean(dim=(2, 3)).flatten()
    assert torch.all(means[:8].diff() > 0)  # slice2 before slice10


def test_short_scan_pad_or_refuse(tmp_path: Path) -> None:
    scan = [Sample(str(write_dicom_series(tmp_path / "short", ramp(3))), "COVID", "p")]
    padded = VolumeStackDataset(scan, ["COVID"], data_config(), train=False)
    x, _ = padded[0]
    assert x.shape[1] == 4 and torch.equal(x[0, -1], x[0, -2])  # edge slice repeated
    with pytest.raises(DataError, match="short.*fewer than data.depth"):
        VolumeStackDataset(scan, ["COVID"], data_config(volume={"short_scan": "refuse"}), train=False)


def test_bad_series_have_clear_errors(tmp_path: Path) -> None:
    single = write_dicom_series(tmp_path / "single", ramp(1))
    with pytest.raises(DataError, match="single-slice"):
        VolumeStackDataset([Sample(str(single), "COVID")], ["COVID"], data_config(), train=False)
    assert len(VolumeStackDataset([Sample(str(single), "COVID")], ["COVID"], data_config(depth=1), train=False)) == 1
    mr = write_dicom_series(tmp_path / "mr", ramp(4), modality="MR")
    with pytest.raises(DataError, match="mr.*modality"):
        VolumeStackDataset([Sample(str(mr), "COVID")], ["COVID"], data_config(), train=False)
    mixed = write_dicom_series(tmp_path / "mixed", ramp(4), orientations=[AXIAL, AXIAL, (1, 0, 0, 0, 0, -1), AXIAL])
    with pytest.raises(DataError, match="mixed.*orientations"):
        VolumeStackDataset([Sample(str(mixed), "COVID")], ["COVID"], data_config(), train=False)
    gap = write_dicom_series(tmp_path / "gap", ramp(6), positions=[0, 2, 4, 6, 14, 16])
    with pytest.warns(UserWarning, match="missing"):
        VolumeStackDataset([Sample(str(gap), "COVID")], ["COVID"], data_config(), train=False)
    with pytest.raises(DataError, match="2D images"):
        VolumeStackDataset([Sample(str(tmp_path / "x.png"), "COVID")], ["COVID"], data_config(), train=False)


def phantom(slices: int = 6, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Outside air, a soft-tissue body and two air-filled lungs (HU) plus the true lung mask."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1
    lungs = (((xx - 0.32) / 0.12) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1) | (
        ((xx - 0.68) / 0.12) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1
    )
    plane = np.where(lungs, -850.0, np.where(body, 40.0, -1000.0))
    return np.repeat(plane[None], slices, 0), np.repeat(lungs[None], slices, 0)


def test_lung_mask_finds_the_lungs_not_the_outside_air() -> None:
    hu, truth = phantom()
    mask = lung_mask(hu)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95


def test_lung_crop_and_mask_modes(tmp_path: Path) -> None:
    hu, truth = phantom()
    scan = [Sample(str(write_dicom_series(tmp_path / "p", hu)), "COVID")]
    full = VolumeStackDataset(scan, ["COVID"], data_config(image_size=64), train=False).stack(0)
    masked = VolumeStackDataset(
        scan, ["COVID"], data_config(image_size=64, volume={"lung": "mask"}), train=False
    ).stack(0)
    cropped = VolumeStackDataset(
        scan, ["COVID"], data_config(image_size=64, volume={"lung": "crop"}), train=False
    ).stack(0)
    assert float(masked[0, 0][~torch.from_numpy(truth[0])].max()) == 0.0  # outside the lungs is blanked
    assert cropped.shape == full.shape
    lung_share = [float(((x > 0.28) & (x < 0.4)).float().mean()) for x in (full, cropped)]  # -850 HU -> 0.33
    assert lung_share[1] > lung_share[0]  # the lungs fill more of the cropped slices
    images = tmp_path / "images"
    images.mkdir()
    for k in range(4):
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(images / f"{k}.png")
    with pytest.raises(DataError, match="HU"):
        VolumeStackDataset(
            [Sample(str(images), "COVID")], ["COVID"], data_config(volume={"lung": "crop"}), train=False
        )[0]


@pytest.mark.parametrize("lung", ["none", "mask", "crop"])
def test_scans_preprocessed_a_few_slices_at_a_time_equal_the_whole_volume_at_once(tmp_path, monkeypatch, lung):
    hu, _ = phantom()
    stacked = np.concatenate([hu, hu, hu])
    folder = write_dicom_series(tmp_path / "p", stacked + 7.0 * np.arange(len(stacked))[:, None, None])
    config = data_config(image_size=20, volume={"lung": lung, "z_spacing": 3.0})
    header = VolumeStackDataset([Sample(str(folder), "COVID")], ["COVID"], config, train=False).headers[0]
    monkeypatch.setattr(volumes, "SLICES_PER_CHUNK", 10_000)
    whole = volumes.load_scan(folder, config, header)
    monkeypatch.setattr(volumes, "SLICES_PER_CHUNK", 3)
    torch.testing.assert_close(volumes.load_scan(folder, config, header), whole, rtol=0, atol=0)


def test_augmentation_only_when_training(tmp_path: Path) -> None:
    scan = [Sample(str(write_dicom_series(tmp_path / "p", phantom(4, 32)[0])), "COVID")]
    config = data_config(augment=AugmentConfig(rotation=20, zoom=0.2, hflip=True), normalize="sample")
    train = VolumeStackDataset(scan, ["COVID"], config, train=True)
    evaluation = VolumeStackDataset(scan, ["COVID"], config, train=False)
    torch.manual_seed(0)
    assert not torch.equal(train[0][0], train[0][0])
    assert torch.equal(evaluation[0][0], evaluation[0][0])
    torch.manual_seed(1)
    first = train[0][0]
    torch.manual_seed(1)
    assert torch.equal(first, train[0][0])  # reproducible from torch's seed
    assert abs(float(evaluation[0][0].mean())) < 1e-5  # per-sample standardisation


def test_dataset_normalisation_is_refused_for_volumes() -> None:
    with pytest.raises(ConfigError, match="3D"):
        VolumeStackDataset([], ["COVID"], data_config(normalize="dataset"), train=False)


def test_disk_cache_is_reused_across_datasets(tmp_path: Path, monkeypatch) -> None:
    scan = [Sample(str(write_dicom_series(tmp_path / "p", ramp(8))), "COVID", "p")]
    calls = []
    real = volumes.read_volume
    monkeypatch.setattr(volumes, "read_volume", lambda path, **kw: calls.append(path) or real(path, **kw))
    config = data_config(volume={"cache_dir": str(tmp_path / "cache")})
    first = VolumeStackDataset(scan, ["COVID"], config, train=False)[1][0]
    again = VolumeStackDataset(scan, ["COVID"], config, train=False)[1][0]
    assert len(calls) == 1 and torch.equal(first, again)  # the second dataset memory-maps the first's file
    VolumeStackDataset(scan, ["COVID"], dataclasses.replace(config, image_size=20), train=False)[0]
    assert len(calls) == 2  # another preprocessing setting is another cache entry
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
