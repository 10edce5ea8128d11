"""2D lung segmentation: phantoms, the HU-based reference on real DICOM slices, and data.lung."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from covidscan.config import ConfigError, config_from_dict
from covidscan.data.lung import LungFocus, lung_box, lung_mask, lung_mask_2d


def _phantom(size: int = 128, *, noise: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark background, a bright elliptical body, two dark elliptical lungs with a bright vessel in
    one of them; returns (image in [0, 1], true lung mask with the vessel counted as lung)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1
    left = ((xx - 0.32) / 0.13) ** 2 + ((yy - 0.5) / 0.2) ** 2 <= 1
    right = ((xx - 0.68) / 0.12) ** 2 + ((yy - 0.48) / 0.19) ** 2 <= 1
    vessel = (xx - 0.3) ** 2 + (yy - 0.5) ** 2 <= 0.02**2
    image = np.where(body, 0.85, 0.02)
    image = np.where(left | right, 0.3, image)
    image = np.where(vessel, 0.8, image)
    image = image + np.random.default_rng(seed).normal(0, noise, image.shape)
    return np.clip(image, 0, 1).astype(np.float32), left | right


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("size", [64, 128, 400])
def test_phantom_lungs_are_found_with_the_vessel_inside(size):
    image, truth = _phantom(size)
    mask = lung_mask_2d(image)
    assert mask.shape == image.shape and mask.dtype == bool
    assert _iou(mask, truth) > 0.9
    yy, xx = np.mgrid[0:size, 0:size] / size
    assert mask[(xx - 0.3) ** 2 + (yy - 0.5) ** 2 <= 0.015**2].all()  # the vessel is filled in
    assert not mask[:, : size // 20].any()  # the outside air is not lung


def test_no_lungs_gives_an_empty_mask():
    yy, xx = np.mgrid[0:96, 0:96] / 96
    solid_body = np.where(((xx - 0.5) / 0.4) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1, 0.85, 0.02).astype(np.float32)
    assert not lung_mask_2d(solid_body).any()
    assert not lung_mask_2d(np.full((64, 64), 0.5, np.float32)).any()
    with pytest.raises(ValueError, match="one"):
        lung_mask_2d(np.zeros((2, 32, 32), np.float32))


def test_hu_mask_ignores_air_outside_the_body():
    image, truth = _phantom(64, noise=0)
    hu = (image * 1500 - 1350)[None].repeat(3, axis=0)  # the lung window, inverted
    mask = lung_mask(hu)
    assert mask.shape == hu.shape
    assert _iou(mask[1], truth) > 0.9


def test_hu_mask_survives_one_slice_whose_lung_opens_to_the_outside_air():
    image, truth = _phantom(64, noise=0)
    hu = (image * 1500 - 1350)[None].repeat(5, axis=0)
    hu[0, 30:34, :22] = -1000  # a channel from the left lung to the air outside, in the first slice
    mask = lung_mask(hu)  # in 3D that channel joined both lungs to the outside air: the mask was empty
    assert all(_iou(plane, truth) > 0.9 for plane in mask[1:])


def test_lung_focus_crops_masks_or_leaves_the_image():
    image, _ = _phantom(128)
    assert LungFocus("none")(image) is image
    masked = LungFocus("mask")(image)
    assert masked.shape == image.shape and masked[~lung_mask_2d(image)].max() == 0
    rows, _ = lung_box(lung_mask_2d(image))
    cropped = LungFocus("crop")(image)
    assert cropped.shape[0] == cropped.shape[1] == rows.stop - rows.start < 128
    with pytest.raises(ValueError, match="lung mode"):
        LungFocus("both")


def test_lung_focus_uses_an_image_without_lungs_whole_and_warns_once():
    flat = np.full((64, 64), 0.5, np.float32)
    with pytest.warns(UserWarning, match="no lung region"):
        assert LungFocus("crop")(flat) is flat
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LungFocus("mask")(flat) is flat


def test_data_lung_is_validated_and_the_3d_option_refused_on_2d_configs():
    assert config_from_dict({"data": {"lung": "crop"}}).data.lung == "crop"
    with pytest.raises(ConfigError, match="data.lung"):
        config_from_dict({"data": {"volume": {"lung": "mask"}}})
    with pytest.raises(ConfigError, match=r"data\.volume\.lung"):
        config_from_dict({"data": {"spatial_dims": 3, "lung": "mask"}})
    assert config_from_dict({"data": {"spatial_dims": 3, "volume": {"lung": "mask"}}}).data.volume.lung == "mask"


def test_transform_applies_data_lung_before_resizing():
    import torch

    from covidscan.data.transforms import build_transform

    image, _ = _phantom(128)
    config = config_from_dict({"data": {"lung": "mask", "image_size": 32, "channels": 1, "normalize": "none"}}).data
    masked = build_transform(config, train=False)(image)
    plain = build_transform(
        config_from_dict({"data": {"image_size": 32, "channels": 1, "normalize": "none"}}).data, train=False
    )(image)
    assert masked.shape == plain.shape == (1, 32, 32)
    assert torch.count_nonzero(masked[:, :, :2]) == 0 and torch.count_nonzero(plain[:, :, :2]) > 0


@pytest.mark.integration
def test_2d_mask_on_8bit_slices_agrees_with_the_hu_mask(shared_datasets):
    """The reference: the HU-based 3D mask of each covid-ct-md-sample series; the 2D method sees the
    same slices rendered to 8-bit in the lung window (what a JPEG export holds). Slices whose
    reference lung covers under 1% of the image (above or below the lungs) are left out.

    Measured (docs/data.md): 199 slices, mean IoU 0.92, median 0.96; the worst are apex/base slices
    with small lungs (down to 0.35); on the 143 slices where the lungs cover at least 10% of the image
    the lowest is 0.79. Asserted with a margin: mean >= 0.88, and >= 0.75 on those 143 slices."""
    from covidscan.data.io import LUNG_WINDOW, apply_window, read_dicom_series

    root = shared_datasets / "covid-ct-md-sample"
    if not root.is_dir():
        pytest.skip("covid-ct-md-sample is not present")
    ious, large = [], []
    for series in sorted(p for p in root.glob("*/*") if p.is_dir()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the sample keeps every 4th slice: "uneven spacing"
            hu = read_dicom_series(series).hu
        reference = lung_mask(hu)
        for plane, ref in zip(hu, reference):
            if ref.mean() < 0.01:
                continue
            rendered = np.round(apply_window(plane, LUNG_WINDOW) * 255) / 255
            iou = _iou(lung_mask_2d(rendered), ref)
            ious.append(iou)
            if ref.mean() >= 0.10:
                large.append(iou)
    print(
        f"2D vs HU lung mask: {len(ious)} slices, mean IoU {np.mean(ious):.3f}, median {np.median(ious):.3f}, "
        f"min {np.min(ious):.3f}; lungs >= 10% of the image: {len(large)} slices, min {np.min(large):.3f}"
    )
    assert len(ious) >= 190  # every series has a reference (cap001's used to be empty: see the 3D test above)
    assert np.mean(ious) >= 0.88
    assert min(large) >= 0.75
