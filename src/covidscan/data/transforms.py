"""Image tensors for training and evaluation: resize, augmentation, intensity, channels, normalisation.

Resizing and normalisation use ``torchvision.transforms.v2`` (the pure-Python part, usable with
``covidscan.compat``); augmentation is the stack shared with 3D volumes (``covidscan.data.augment``),
and the ``data.intensity`` preprocessing (:class:`IntensityNormalization`, scikit-image) is shared
too. Augmentation runs only when ``train=True``; evaluation and serving share the exact same
deterministic path (resize, ``data.intensity``, channels, normalisation), rebuilt from the config
stored in the checkpoint.

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
from covidscan.data.lung import LungFocus
from covidscan.data.records import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLANK_RANGE = 1e-3  # intensity range below which an image counts as blank (a quarter of an 8-bit grey level)


@dataclass(frozen=True)
class NormStats:
    """Dataset-wide mean/std of [0, 1] grayscale pixels, fitted on the training split only."""

    mean: float
    std: float


class ArrayToTensor(torch.nn.Module):
    """A (H, W) float array to a (1, H, W) float32 tensor."""

    def forward(self, array: np.ndarray) -> torch.Tensor:
        return _to_tensor(array)


class RepeatChannels(torch.nn.Module):
    """Grayscale (1, H, W) stacked to (channels, H, W), as ImageNet backbones expect RGB."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.expand(self.channels, -1, -1).contiguous()

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class IntensityNormalization(torch.nn.Module):
    """Per-slice histogram equalisation (``equalize``) or CLAHE (``clahe``), scikit-image's.

    Deterministic, so it runs at training and evaluation time alike: every image reaches the model
    with a comparable intensity distribution whatever the scanner's or the export's contrast curve.
    """

    def __init__(self, method: str) -> None:
        super().__init__()
        if method not in ("equalize", "clahe"):
            raise ValueError(f"intensity method must be 'equalize' or 'clahe', got {method!r}")
        self.method = method

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from skimage import exposure

        planes = []
        for plane in image.detach().cpu().numpy().astype(np.float64).reshape(-1, *image.shape[-2:]):
            if np.ptp(plane) < BLANK_RANGE:  # a blank slice has no histogram to spread (noise would be amplified)
                planes.append(plane)
            elif self.method == "equalize":
                planes.append(exposure.equalize_hist(plane, nbins=256))
            else:
                planes.append(exposure.equalize_adapthist(np.clip(plane, 0, 1), clip_limit=0.01, nbins=256))
        return torch.from_numpy(np.stack(planes).astype(np.float32)).reshape(image.shape)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


def build_intensity(method: str) -> IntensityNormalization | None:
    """The ``data.intensity`` preprocessing, or None for ``none``."""
    return None if method == "none" else IntensityNormalization(method)


class PerSampleStandardize(torch.nn.Module):
    """Keras' ``samplewise_center`` + ``samplewise_std_normalization``."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - image.mean()) / image.std().clamp(min=1e-6)


def _normalizers(config: DataConfig, stats: NormStats | None) -> list[torch.nn.Module]:
    """Normalisation steps; ``sample+dataset`` is Keras' order (``ImageDataGenerator.standardize``:
    samplewise, then featurewise with statistics fitted on the training images)."""
    channels = config.channels
    if config.normalize == "imagenet":
        if channels == 3:
            return [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return [v2.Normalize([float(np.mean(IMAGENET_MEAN))], [float(np.mean(IMAGENET_STD))])]
    if config.normalize == "inception":
        return [v2.Normalize([0.5] * channels, [0.5] * channels)]
    steps: list[torch.nn.Module] = []
    if config.normalize in ("sample", "sample+dataset"):
        steps.append(PerSampleStandardize())
    if config.normalize in ("dataset", "sample+dataset"):
        if stats is None:
            raise ValueError(
                f"normalize: {config.normalize} needs NormStats fitted on the training split (fit_norm_stats)"
            )
        steps.append(v2.Normalize([stats.mean] * channels, [max(stats.std, 1e-6)] * channels))
    return steps


def uses_dataset_stats(config: DataConfig) -> bool:
    """Whether ``data.normalize`` needs :class:`NormStats` fitted on the training split."""
    return config.normalize in ("dataset", "sample+dataset")


def build_transform(config: DataConfig, *, train: bool, stats: NormStats | None = None) -> v2.Compose:
    """Map a (H, W) float32 [0, 1] grayscale array to a normalised (C, S, S) tensor."""
    size = config.image_size
    steps: list[torch.nn.Module] = [ArrayToTensor(), v2.Resize((size, size), antialias=True)]
    if config.lung != "none":  # on the [0, 1] image, before anything else, at train and eval time alike
        steps.insert(0, v2.Lambda(LungFocus(config.lung)))
    augmentation = None
    if train:
        from covidscan.data.augment import build_augmentation  # MONAI: imported for training only

        augmentation = build_augmentation(config.augment, size)
    intensity = build_intensity(config.intensity)
    steps += [step for step in (augmentation, intensity) if step is not None]
    if config.channels == 3:
        steps.append(RepeatChannels(3))
    steps += _normalizers(config, stats)
    return v2.Compose(steps)


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]


def fit_norm_stats(images: Iterable[np.ndarray], image_size: int, intensity: str = "none") -> NormStats:
    """Dataset-wide mean/std (Keras ``featurewise_center``) over the resized training images, after
    the ``data.intensity`` preprocessing when there is one (what the normalisation step receives)."""
    steps: list[torch.nn.Module] = [v2.Resize((image_size, image_size), antialias=True)]
    steps += [step for step in (build_intensity(intensity),) if step is not None]
    preprocess = v2.Compose(steps)
    total, total_sq, count = 0.0, 0.0, 0
    for array in images:
        pixels = preprocess(_to_tensor(array)).double()
        total += float(pixels.sum())
        total_sq += float((pixels**2).sum())
        count += pixels.numel()
    if count == 0:
        raise DataError("cannot fit normalisation statistics on an empty training split")
    mean = total / count
    return NormStats(mean=mean, std=max((total_sq / count - mean**2) ** 0.5, 1e-6))
