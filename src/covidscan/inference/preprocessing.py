"""One model's evaluation-time input pipeline, rebuilt from its training config.

2D models take a decoded ``(H, W)`` image in [0, 1] through ``build_transform(train=False)``; 3D
models take a scan through the volume pipeline of training (``covidscan.data.volumes``). Ensemble
members whose pipelines are equal share one preprocessed copy of each input.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from covidscan.config import DataConfig, WindowConfig
from covidscan.data import NormStats, Sample, build_dataset, build_transform
from covidscan.data.datasets import SampleDataset
from covidscan.errors import UsageError

# DataConfig fields that change what a model sees at evaluation time (the rest are about training data)
_INPUT_FIELDS = ("spatial_dims", "image_size", "channels", "window", "normalize", "depth")
_VOLUME_FIELDS = ("z_spacing", "lung", "short_scan", "stride")


@dataclass(frozen=True, eq=False)
class Preprocessing:
    """The deterministic evaluation transform of one model: its data config and normalisation stats."""

    data: DataConfig
    norm_stats: NormStats | None = None

    @property
    def spatial_dims(self) -> int:
        return self.data.spatial_dims

    @property
    def window(self) -> WindowConfig | None:
        return self.data.window

    @cached_property
    def key(self) -> str:
        """Equal keys mean identical model inputs (so ensemble members can share them)."""
        settings: dict[str, Any] = {name: getattr(self.data, name) for name in _INPUT_FIELDS}
        settings["window"] = asdict(self.data.window) if self.data.window else None
        if self.spatial_dims == 3:
            settings["volume"] = {name: getattr(self.data.volume, name) for name in _VOLUME_FIELDS}
        else:
            settings.pop("depth")
        settings["norm_stats"] = asdict(self.norm_stats) if self.norm_stats else None
        return json.dumps(settings, sort_keys=True)

    @cached_property
    def transform(self):
        """``(H, W)`` [0, 1] image -> ``(C, S, S)`` tensor (2D models)."""
        if self.spatial_dims != 2:
            raise UsageError("a 3D model takes scans (slice stacks), not single images")
        return build_transform(self.data, train=False, stats=self.norm_stats)

    def image(self, pixels: np.ndarray) -> torch.Tensor:
        return self.transform(pixels)

    def dataset(self, samples: Sequence[Sample], class_names: Sequence[str]) -> SampleDataset:
        """Items ``(tensor, class index)``: one per image (2D) or per slice stack of a scan (3D)."""
        return build_dataset(self.data, list(samples), list(class_names), train=False, stats=self.norm_stats)

    def input_shape(self) -> tuple[int, ...]:
        """One preprocessed item's shape: ``(C, S, S)``, or ``(C, D, S, S)`` for stacks."""
        size, channels = self.data.image_size, self.data.channels
        return (channels, size, size) if self.spatial_dims == 2 else (channels, self.data.depth, size, size)
