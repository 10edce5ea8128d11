"""PyTorch datasets over :class:`~covidscan.data.records.Sample` lists (2D slices / images)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from covidscan.config import DataConfig, ReadLimits, WindowConfig
from covidscan.data.io import read_image
from covidscan.data.records import Sample
from covidscan.data.transforms import NormStats, build_transform


class SampleDataset(Dataset[tuple[torch.Tensor, int]]):
    """What ``build_dataset`` returns: ``(tensor, class index)`` items (-1 when unlabeled), a length,
    and ``item_samples``, the sample behind each item (evaluation aggregates them per patient)."""

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def item_samples(self) -> list[Sample]:
        raise NotImplementedError


class ImageDataset(SampleDataset):
    """Reads each image lazily (nothing held in RAM) and returns ``(tensor, class index)``.

    Unlabeled samples get index -1. Decoding errors surface as ``DataError`` naming the file.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        transform: Callable[[np.ndarray], torch.Tensor],
        window: WindowConfig | None = None,
        limits: ReadLimits | None = None,
    ) -> None:
        self.samples = list(samples)
        self.class_index = {name: i for i, name in enumerate(class_names)}
        self.transform = transform
        self.window = window
        self.limits = limits

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def item_samples(self) -> list[Sample]:
        """The sample behind each item (one per image here; one per slice stack for volumes)."""
        return self.samples

    def read(self, index: int) -> np.ndarray:
        return read_image(self.samples[index].path, self.window, limits=self.limits)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        label = self.class_index[sample.label] if sample.label is not None else -1
        return self.transform(self.read(index)), label


def build_dataset(
    config: DataConfig,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    *,
    train: bool,
    stats: NormStats | None = None,
) -> SampleDataset:
    """The dataset a config asks for: 2D images, or (``spatial_dims: 3``) slice stacks of volumes."""
    if config.spatial_dims == 3:
        from covidscan.data.volumes import build_volume_dataset

        return build_volume_dataset(config, samples, class_names, train=train)
    return ImageDataset(
        samples, class_names, build_transform(config, train=train, stats=stats), config.window, config.limits
    )
