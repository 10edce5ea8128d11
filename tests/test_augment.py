"""Robust augmentation (one stack for images and slice stacks) and intensity preprocessing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from covidscan.config import AUGMENT_PRESETS, AugmentConfig, ConfigError, DataConfig, config_from_dict
from covidscan.data.augment import build_augmentation
from covidscan.data.transforms import NormStats, build_transform, fit_norm_stats
from covidscan.data.volumes import volume_transform

SIZE = 32
# each robustness option alone, switched on strongly and always firing (prob 1)
SINGLE_OPTIONS = {
    "rotation": {"rotation": 30.0},
    "zoom": {"zoom": 0.3},
    "shift": {"shift": 0.2},
    "hflip": {"hflip": True},
    "brightness": {"brightness": 0.5},
    "gamma": {"gamma": 0.5},
    "contrast": {"contrast": 0.5},
    "blur": {"blur": 2.0},
    "noise": {"noise": 0.1},
    "low_resolution": {"low_resolution": 0.6},
    "jpeg_quality": {"jpeg_quality": 5},
    "crop": {"crop": 0.5},
}


def _image(slices: int | None = None) -> torch.Tensor:
    """A smooth (1, H, W) image or a (1, D, H, W) stack of it in [0.1, 0.9], not symmetric."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    plane = torch.from_numpy((0.1 + 0.8 * (0.6 * x + 0.4 * y**2)).astype(np.float32))
    return plane[None] if slices is None else plane.expand(slices, -1, -1)[None].clone()


def _augmentation(**options):
    return build_augmentation(AugmentConfig(prob=1.0, **options), SIZE)


@pytest.mark.parametrize("option", sorted(SINGLE_OPTIONS))
@pytest.mark.parametrize("slices", [None, 3], ids=["image", "stack"])
def test_each_option_keeps_shape_and_range_changes_the_image_and_follows_the_seed(option, slices):
    augment, image = _augmentation(**SINGLE_OPTIONS[option]), _image(slices)
    outputs = []
    for seed in range(4):
        torch.manual_seed(seed)
        out = augment(image)
        torch.manual_seed(seed)
        assert torch.equal(out, augment(image))  # deterministic under torch's seed
        assert out.shape == image.shape and out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        outputs.append(out)
    assert any(not torch.allclose(out, image, atol=1e-3) for out in outputs)  # the step does something
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])  # and differs between draws


@pytest.mark.parametrize("option", sorted(set(SINGLE_OPTIONS) - {"noise"}))
def test_a_stack_gets_the_same_transform_on_every_slice(option):
    torch.manual_seed(0)
    out = _augmentation(**SINGLE_OPTIONS[option])(_image(3))
    assert torch.allclose(out[0, 0], out[0, 1]) and torch.allclose(out[0, 0], out[0, 2])


def test_augmentation_is_off_at_evaluation_but_intensity_preprocessing_is_not():
    everything = AugmentConfig(preset="robust", rotation=10, zoom=0.1, shift=0.1, hflip=True, brightness=0.2)
    array = _image()[0].numpy()
    for intensity in ("none", "equalize", "clahe"):
        plain = DataConfig(image_size=SIZE, channels=3, intensity=intensity)
        augmented = dataclasses.replace(plain, augment=everything)
        evaluation = build_transform(augmented, train=False)(array)
        assert torch.equal(evaluation, build_transform(plain, train=False)(array))
        assert torch.equal(evaluation, build_transform(augmented, train=False)(array))  # deterministic
        torch.manual_seed(0)
        assert not torch.equal(build_transform(augmented, train=True)(array), evaluation)
    no_intensity = build_transform(DataConfig(image_size=SIZE, normalize="none"), train=False)(array)
    equalized = build_transform(DataConfig(image_size=SIZE, normalize="none", intensity="equalize"), train=False)
    assert not torch.allclose(equalized(array), no_intensity)
    stack = _image(3)
    volume_eval = volume_transform(DataConfig(image_size=SIZE, augment=everything, intensity="clahe"), train=False)
    assert torch.equal(volume_eval(stack), volume_eval(stack))


def test_fill_modes_and_interpolation_follow_keras():
    ones = torch.ones(1, SIZE, SIZE)
    options = {"rotation": 45.0, "zoom": 0.0}
    torch.manual_seed(3)
    black = _augmentation(**options, fill="constant")(ones)
    torch.manual_seed(3)
    edge = _augmentation(**options, fill="nearest")(ones)
    assert float(black.min()) == 0.0  # rotated corners filled with black
    assert torch.allclose(edge, ones)  # Keras fill_mode="nearest": the edge is replicated
    step = (torch.arange(SIZE) >= SIZE // 2).float().expand(SIZE, SIZE)[None]
    rotate = {"rotation": 20.0, "fill": "nearest"}
    torch.manual_seed(1)
    nearest = _augmentation(**rotate, interpolation="nearest")(step)
    torch.manual_seed(1)
    bilinear = _augmentation(**rotate, interpolation="bilinear")(step)
    assert set(nearest.unique().tolist()) <= {0.0, 1.0}
    assert ((bilinear > 0.01) & (bilinear < 0.99)).any()  # interpolated values along the rotated edge


def test_presets_fill_unset_options_and_explicit_values_win():
    preset = AugmentConfig(preset="robust").resolved()
    assert {name: getattr(preset, name) for name in AUGMENT_PRESETS["robust"]} == AUGMENT_PRESETS["robust"]
    overridden = AugmentConfig(preset="robust", noise=0.0, blur=0.5).resolved()
    assert overridden.noise == 0 and overridden.blur == 0.5 and overridden.gamma == AUGMENT_PRESETS["robust"]["gamma"]
    assert all(getattr(AugmentConfig().resolved(), name) == 0 for name in AUGMENT_PRESETS["robust"])
    config = config_from_dict({"data": {"augment": {"preset": "robust"}}}, ["data.augment.noise=0"])
    assert config.data.augment.resolved().noise == 0 and config.data.augment.resolved().crop == 0.2
    reloaded = config_from_dict(config.to_dict())
    assert reloaded.data.augment.resolved() == config.data.augment.resolved()  # the saved config means the same


@pytest.mark.parametrize(
    "options, key",
    [
        ({"preset": "strong"}, "preset"),
        ({"jpeg_quality": 100}, "jpeg_quality"),
        ({"gamma": 1.0}, "gamma"),
        ({"blur": -1.0}, "blur"),
        ({"prob": 1.5}, "prob"),
        ({"fill": "wrap"}, "fill"),
        ({"interpolation": "bicubic"}, "interpolation"),
    ],
)
def test_invalid_augmentation_options_name_the_key(options, key):
    with pytest.raises(ConfigError, match=f"data.augment.{key}"):
        config_from_dict({"data": {"augment": options}})


def test_intensity_preprocessing_spreads_the_histogram_and_leaves_blank_images_alone():
    low_contrast = (0.4 + 0.1 * _image()[0]).numpy()
    for intensity in ("equalize", "clahe"):
        transform = build_transform(
            DataConfig(image_size=SIZE, channels=1, normalize="none", intensity=intensity), train=False
        )
        out = transform(low_contrast)
        assert out.shape == (1, SIZE, SIZE) and float(out.min()) >= 0 and float(out.max()) <= 1
        assert float(out.max() - out.min()) > 0.5 > float(low_contrast.max() - low_contrast.min())
        blank = (0.3 + 1e-5 * (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 2)).astype(np.float32)
        assert torch.allclose(transform(blank), torch.from_numpy(blank)[None])
    with pytest.raises(ConfigError, match="data.intensity"):
        config_from_dict({"data": {"intensity": "gamma"}})


def test_dataset_statistics_are_fitted_after_intensity_preprocessing():
    images = [(0.4 + 0.1 * _image()[0]).numpy()]
    raw, equalized = fit_norm_stats(images, SIZE), fit_norm_stats(images, SIZE, intensity="equalize")
    assert raw != equalized and abs(equalized.mean - 0.5) < 0.1


def test_sample_plus_dataset_normalisation_is_keras_order():
    array = _image()[0].numpy()
    stats = NormStats(mean=0.4, std=0.2)
    both = build_transform(
        DataConfig(image_size=SIZE, channels=1, normalize="sample+dataset"), train=False, stats=stats
    )
    sample = build_transform(DataConfig(image_size=SIZE, channels=1, normalize="sample"), train=False)
    assert torch.allclose(both(array), (sample(array) - 0.4) / 0.2, atol=1e-5)
    with pytest.raises(ValueError, match="NormStats"):
        build_transform(DataConfig(normalize="sample+dataset"), train=False)
    with pytest.raises(ConfigError, match="3D"):
        volume_transform(DataConfig(spatial_dims=3, normalize="sample+dataset"), train=False)


def test_inception_normalisation_maps_the_unit_range_to_plus_minus_one():
    ramp = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    out = build_transform(DataConfig(image_size=SIZE, channels=3, normalize="inception"), train=False)(ramp)
    assert float(out.min()) == pytest.approx(-1.0, abs=1e-3) and float(out.max()) == pytest.approx(1.0, abs=1e-3)
    stack = volume_transform(DataConfig(image_size=SIZE, channels=3, normalize="inception"), train=False)
    assert torch.allclose(stack(_image(2)), _image(2).expand(3, -1, -1, -1) * 2 - 1, atol=1e-6)
