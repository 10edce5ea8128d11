"""One augmentation stack for 2D images and 3D slice stacks (training time only).

Everything works on a ``(1, H, W)`` image or a ``(1, D, H, W)`` stack in [0, 1], before channel
stacking and normalisation. A stack is augmented as one D-channel 2D image: every slice gets the
same in-plane transform and nothing moves across slices, so 2D and 3D share every transform.

Libraries, and why each:

- MONAI array transforms for the random part (``RandAffine``, ``RandFlip``, ``RandScaleCrop`` +
  ``Resize``, ``RandScaleIntensity``, ``RandScaleIntensityFixedMean``, ``RandAdjustContrast``,
  ``RandSimulateLowResolution``, ``RandGaussianSmooth``, ``RandGaussianNoise``): the same transform
  serves 2D and 3D, and its resampling offers Keras' fill modes (``padding_mode`` "zeros",
  "border" = Keras ``fill_mode="nearest"``, "reflection"), which ``torchvision.transforms.v2``
  (constant fill only) does not.
- Pillow's libjpeg for JPEG-quality degradation: ``v2.JPEG`` needs torchvision's compiled image
  codecs, which do not load with the CPU torch build used here (``covidscan.compat``), and MONAI has
  no JPEG transform. :class:`RandJPEG` is only the glue (one encode/decode per slice).

The deterministic ``data.intensity`` preprocessing that follows it lives in ``transforms.py``
(:class:`~covidscan.data.transforms.IntensityNormalization`). This module imports MONAI, so the
transforms import it only when they build a training transform (serving never pays for it).

Random draws follow torch's RNG (:class:`RandomAugmentation` seeds MONAI from it on every call), so
the trainer's seed and DataLoader's per-worker seeds make augmentation reproducible. Every piece is
a class instance, so transforms pickle for ``spawn`` DataLoader workers.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandomizableTransform,
    RandScaleCrop,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
    RandSimulateLowResolution,
    Resize,
)
from monai.utils import convert_to_tensor

from covidscan.config import AugmentConfig

# Keras ImageDataGenerator fill_mode -> grid_sample padding mode
_PADDING = {"constant": "zeros", "nearest": "border", "reflect": "reflection"}
JPEG_MAX_QUALITY = 95  # the top of the quality range drawn from (Pillow's "maximum useful" setting)


class ClampUnit(torch.nn.Module):
    """Clip intensities back into [0, 1] after an intensity augmentation."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.clamp(0.0, 1.0)


def _planes(image: torch.Tensor) -> np.ndarray:
    """The 2D slices of a (C, [D,] H, W) tensor as one (N, H, W) float array."""
    return image.detach().cpu().numpy().reshape(-1, *image.shape[-2:])


class RandJPEG(RandomizableTransform):
    """Re-encode each slice as JPEG at a random quality in ``[min_quality, max_quality]`` (Pillow)."""

    def __init__(self, min_quality: int, max_quality: int = JPEG_MAX_QUALITY, prob: float = 1.0) -> None:
        RandomizableTransform.__init__(self, prob)
        self.min_quality, self.max_quality = min_quality, max(min_quality, max_quality)
        self.quality = max_quality

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.quality = int(self.R.randint(self.min_quality, self.max_quality + 1))

    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        from PIL import Image

        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        slices = []
        for plane in _planes(image):
            buffer = io.BytesIO()
            Image.fromarray(np.round(np.clip(plane, 0, 1) * 255).astype(np.uint8)).save(
                buffer, format="JPEG", quality=self.quality
            )
            slices.append(np.asarray(Image.open(buffer), dtype=np.float32) / 255.0)
        return torch.from_numpy(np.stack(slices)).reshape(image.shape).to(image.dtype)


class RandomAugmentation(torch.nn.Module):
    """MONAI random transforms, seeded from torch's RNG on every call; returns a plain tensor.

    The transforms share one NumPy ``RandomState``, re-seeded per call (one seeding instead of a
    new generator per transform, as ``Compose.set_random_state`` would make). A (1, D, H, W) stack
    is passed to the 2D transforms as a (D, H, W) image and shaped back."""

    def __init__(self, transforms: list) -> None:
        super().__init__()
        self.transforms = Compose(transforms)
        self.random_state = np.random.RandomState()
        for transform in transforms:
            if isinstance(transform, Randomizable):
                transform.set_random_state(state=self.random_state)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.random_state.seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        planes = image.reshape(-1, *image.shape[-2:])
        return convert_to_tensor(self.transforms(planes), track_meta=False).reshape(image.shape)

    def extra_repr(self) -> str:
        return ", ".join(type(t).__name__ for t in self.transforms.transforms)


def _geometric(aug: AugmentConfig, size: int) -> list:
    steps: list = []
    if aug.crop:  # like v2.RandomResizedCrop: a random box (aspect ratio varies), resized back
        steps += [
            RandScaleCrop(roi_scale=1 - aug.crop, max_roi_scale=1.0, random_size=True),
            Resize(spatial_size=(size, size), mode="bilinear"),
        ]
    if aug.rotation or aug.zoom or aug.shift:
        steps.append(
            RandAffine(
                prob=1.0,
                rotate_range=(np.deg2rad(aug.rotation),),
                scale_range=(aug.zoom, aug.zoom),
                translate_range=(aug.shift * size, aug.shift * size),
                mode=aug.interpolation,
                padding_mode=_PADDING[aug.fill],
            )
        )
    if aug.hflip:
        steps.append(RandFlip(prob=0.5, spatial_axis=1))
    return steps


def _photometric(aug: AugmentConfig) -> list:
    steps: list = []
    if aug.brightness:
        steps.append(RandScaleIntensity(factors=aug.brightness, prob=1.0))
    if aug.contrast:
        steps.append(RandScaleIntensityFixedMean(factors=aug.contrast, fixed_mean=True, prob=aug.prob))
    if aug.gamma:
        steps.append(RandAdjustContrast(gamma=(1 - aug.gamma, 1 + aug.gamma), prob=aug.prob))
    if steps:
        steps.append(ClampUnit())
    degradations: list = []
    if aug.low_resolution:
        degradations.append(
            RandSimulateLowResolution(
                prob=aug.prob,
                zoom_range=(1 - aug.low_resolution, 1.0),
                downsample_mode="area",
                upsample_mode="bilinear",
            )
        )
    if aug.blur:
        degradations.append(RandGaussianSmooth(sigma_x=(0.0, aug.blur), sigma_y=(0.0, aug.blur), prob=aug.prob))
    if aug.noise:
        degradations.append(RandGaussianNoise(prob=aug.prob, mean=0.0, std=aug.noise))
    if degradations:
        degradations.append(ClampUnit())
    if aug.jpeg_quality:
        degradations.append(RandJPEG(aug.jpeg_quality, prob=aug.prob))
    return steps + degradations


def build_augmentation(augment: AugmentConfig, size: int) -> RandomAugmentation | None:
    """The training augmentation ``data.augment`` asks for (images and stacks alike), or None
    when every option is off.

    Order: framing (crop, affine, flip), then acquisition (brightness, contrast, gamma), then
    degradation (resolution, blur, noise, JPEG); intensity preprocessing follows in the transform.
    """
    aug = augment.resolved()
    steps = _geometric(aug, size) + _photometric(aug)
    return RandomAugmentation(steps) if steps else None
