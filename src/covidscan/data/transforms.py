"""Image tensors for training and evaluation: resize, study augmentations, channels, normalisation.

Built on ``torchvision.transforms.v2`` (the pure-Python part, usable with ``covidscan.compat``).
Augmentation runs only when ``train=True``; evaluation and serving share the exact same
deterministic path, rebuilt from the config stored in the checkpoint.

Every step is a named module (no lambdas), so a transform pickles: DataLoader workers started with
``spawn`` or ``forkserver`` (macOS, Windows, Python >= 3.14's default) receive it by pickling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

from covidscan import compat  # noqa: F401
from covidscan.config import DataConfig
from covidscan.data.records import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class NormStats:
    """Dataset-wide mean/std of [0, 1] grayscale pixels, fitted on the training split only."""

    mean: float
    std: float


class ArrayToTensor(torch.nn.Module):
    """A (H, W) float array to a (1, H, W) float32 tensor."""

    def forward(self, array: np.ndarray) -> torch.Tensor:
        return _to_tensor(array)


class ClampUnit(torch.nn.Module):
    """Clip intensities back into [0, 1] after an intensity augmentation."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.clamp(0.0, 1.0)


class RepeatChannels(torch.nn.Module):
    """Grayscale (1, H, W) stacked to (channels, H, W), as ImageNet backbones expect RGB."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.expand(self.channels, -1, -1).contiguous()

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class PerSampleStandardize(torch.nn.Module):
    """Keras' ``samplewise_center`` + ``samplewise_std_normalization``."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - image.mean()) / image.std().clamp(min=1e-6)


def _normalizer(config: DataConfig, stats: NormStats | None) -> torch.nn.Module | None:
    if config.normalize == "imagenet":
        if config.channels == 3:
            return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        return v2.Normalize([float(np.mean(IMAGENET_MEAN))], [float(np.mean(IMAGENET_STD))])
    if config.normalize == "sample":
        return PerSampleStandardize()
    if config.normalize == "dataset":
        if stats is None:
            raise ValueError("normalize: dataset needs NormStats fitted on the training split (fit_norm_stats)")
        return v2.Normalize([stats.mean] * config.channels, [max(stats.std, 1e-6)] * config.channels)
    return None


def build_transform(config: DataConfig, *, train: bool, stats: NormStats | None = None) -> v2.Compose:
    """Map a (H, W) float32 [0, 1] grayscale array to a normalised (C, S, S) tensor."""
    size = config.image_size
    steps: list[torch.nn.Module] = [ArrayToTensor(), v2.Resize((size, size), antialias=True)]
    aug = config.augment
    if train:
        if aug.rotation or aug.shift or aug.zoom:
            steps.append(
                v2.RandomAffine(
                    degrees=aug.rotation,
                    translate=(aug.shift, aug.shift) if aug.shift else None,
                    scale=(1 - aug.zoom, 1 + aug.zoom) if aug.zoom else None,
                )
            )
        if aug.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if aug.brightness:
            steps.append(v2.ColorJitter(brightness=aug.brightness))
            steps.append(ClampUnit())
    if config.channels == 3:
        steps.append(RepeatChannels(3))
    normalizer = _normalizer(config, stats)
    if normalizer is not None:
        steps.append(normalizer)
    return v2.Compose(steps)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]


def fit_norm_stats(images: Iterable[np.ndarray], image_size: int) -> NormStats:
    """Dataset-wide mean/std (Keras ``featurewise_center``) over resized training images."""
    resize = v2.Resize((image_size, image_size), antialias=True)
    total, total_sq, count = 0.0, 0.0, 0
    for array in images:
        pixels = resize(_to_tensor(array)).double()
        total += float(pixels.sum())
        total_sq += float((pixels**2).sum())
        count += pixels.numel()
    if count == 0:
        raise DataError("cannot fit normalisation statistics on an empty training split")
    mean = total / count
    return NormStats(mean=mean, std=max((total_sq / count - mean**2) ** 0.5, 1e-6))
