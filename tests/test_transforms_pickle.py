"""Every transform a config can make pickles, and runs in DataLoader workers started with ``spawn``.

``spawn`` / ``forkserver`` (macOS, Windows, Python >= 3.14's default) send the dataset, with its
transform, to each worker by pickling; a lambda anywhere in it fails there and nowhere else.
"""

from __future__ import annotations

import dataclasses
import pickle
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from covidscan.config import AugmentConfig, DataConfig, load_config
from covidscan.data import Sample, build_dataset
from covidscan.data.transforms import NormStats, build_transform
from covidscan.data.volumes import volume_transform

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
STATS = NormStats(mean=0.4, std=0.2)
SIZE = 16


# a non-default value per augmentation option, so the step it adds is built
SWITCHED_ON = {
    "rotation": 10.0,
    "zoom": 0.1,
    "shift": 0.1,
    "hflip": True,
    "brightness": 0.2,
    "interpolation": "bilinear",
    "fill": "nearest",
    "preset": "robust",
    "gamma": 0.3,
    "contrast": 0.3,
    "blur": 1.0,
    "noise": 0.05,
    "low_resolution": 0.5,
    "jpeg_quality": 30,
    "crop": 0.2,
    "prob": 1.0,
}


def _switched_on(field: dataclasses.Field) -> object:
    assert field.name in SWITCHED_ON, f"the pickling test does not know how to switch on data.augment.{field.name}"
    return SWITCHED_ON[field.name]


def _option_configs() -> list[DataConfig]:
    """One config per augmentation option (alone), normalisation and channel count, intensity
    preprocessing, for 2D and 3D."""
    configs = []
    for dims in (2, 3):
        for field in dataclasses.fields(AugmentConfig):
            augment = AugmentConfig(**{field.name: _switched_on(field)})
            configs.append(DataConfig(image_size=SIZE, channels=3, spatial_dims=dims, depth=2, augment=augment))
        for normalize in typing.get_args(typing.get_type_hints(DataConfig)["normalize"]):
            if dims == 3 and "dataset" in normalize:
                continue  # refused for volumes (tests/test_volumes.py)
            for channels in (1, 3):
                configs.append(
                    DataConfig(image_size=SIZE, channels=channels, spatial_dims=dims, depth=2, normalize=normalize)
                )
        for intensity in ("equalize", "clahe"):
            configs.append(DataConfig(image_size=SIZE, channels=3, spatial_dims=dims, depth=2, intensity=intensity))
    return configs


def _all_data_configs() -> list[DataConfig]:
    shipped = [dataclasses.replace(load_config(path).data, image_size=SIZE, depth=2) for path in CONFIGS]
    return shipped + _option_configs()


def _transform(config: DataConfig, train: bool):
    if config.spatial_dims == 3:
        return volume_transform(config, train=train)
    return build_transform(config, train=train, stats=STATS)


def _input(config: DataConfig) -> np.ndarray | torch.Tensor:
    rng = np.random.default_rng(0)
    if config.spatial_dims == 3:
        return torch.from_numpy(rng.random((1, config.depth, SIZE, SIZE), dtype=np.float32))
    return rng.random((24, 20), dtype=np.float32)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_config_transform_pickles_and_still_works(train):
    configs = _all_data_configs()
    assert len(configs) > len(CONFIGS)
    for config in configs:
        transform = _transform(config, train)
        clone = pickle.loads(pickle.dumps(transform))
        out = clone(_input(config))
        spatial = (config.depth, SIZE, SIZE) if config.spatial_dims == 3 else (SIZE, SIZE)
        assert tuple(out.shape) == (config.channels, *spatial), config
        if not train:  # deterministic: the copy computes what the original does
            assert torch.allclose(torch.as_tensor(out), torch.as_tensor(transform(_input(config))))


def _image_folder(root: Path) -> list[Sample]:
    root.mkdir(parents=True)
    samples = []
    for i in range(2):
        path = root / f"{i}.png"
        Image.fromarray(np.full((20, 24), 40 + 100 * i, np.uint8)).save(path)
        samples.append(Sample(str(path), "COVID"))
    return samples


def _slice_folder(root: Path) -> list[Sample]:
    _image_folder(root)
    return [Sample(str(root), "COVID")]


def test_spawned_dataloader_workers_run_every_augmentation_with_3_channels(tmp_path):
    images, scan = _image_folder(tmp_path / "images"), _slice_folder(tmp_path / "scan")
    datasets = []
    for config in _option_configs():
        if config.channels == 3:
            samples = scan if config.spatial_dims == 3 else images
            datasets.append(build_dataset(config, samples, ["COVID"], train=True, stats=STATS))
    dataset = ConcatDataset(datasets)
    loader = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    items = list(loader)
    assert len(items) == len(dataset)
    assert {tuple(tensor.shape) for tensor, _ in items} == {(3, SIZE, SIZE), (3, 2, SIZE, SIZE)}
    assert all(label == 0 and torch.isfinite(tensor).all() for tensor, label in items)
