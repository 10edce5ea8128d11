"""Test-time augmentation: the mean of a model's probabilities over a few label-preserving views.

Each view is a deterministic transform of the *preprocessed* batch, ``(N, C, H, W)`` or
``(N, C, D, H, W)``, acting in-plane only (never across slices): ``identity``, ``hflip``
(left-right mirror, the flip the studies' training augmentation uses) and ``shift`` (four copies
moved by ``SHIFT_FRACTION`` of the side, up/down/left/right, edges replicated). The views are
written here because they are three tensor operations on an already-preprocessed batch; the
training augmentations (torchvision / MONAI) are random and act before normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn.functional as F

from covidscan.errors import UsageError

SHIFT_FRACTION = 0.04
TTA_VIEWS = ("identity", "hflip", "shift")
DEFAULT_TTA = ("identity", "hflip")


def _shifted(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x`` shifted by ``rows``/``cols`` steps of the shift size (see ``_pixels``)."""
    return _shift(x, *_pixels(x, rows, cols))


def _shift(batch: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Move the image content by (rows, cols) pixels, replicating the edge into the vacated border."""
    shape = batch.shape
    planes = batch.reshape(shape[0], -1, *shape[-2:])  # (N, C*D, H, W): in-plane for 2D and 3D alike
    pad = (max(cols, 0), max(-cols, 0), max(rows, 0), max(-rows, 0))
    padded = F.pad(planes, pad, mode="replicate")
    height, width = shape[-2:]
    top, left = max(-rows, 0), max(-cols, 0)
    return padded[..., top : top + height, left : left + width].reshape(shape)


def view_transforms(views: Iterable[str]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The batch transforms for ``views`` (names from ``TTA_VIEWS``), in order."""
    transforms: list[Callable[[torch.Tensor], torch.Tensor]] = []
    for view in views:
        if view == "identity":
            transforms.append(lambda x: x)
        elif view == "hflip":
            transforms.append(lambda x: torch.flip(x, dims=(-1,)))
        elif view == "shift":
            for rows, cols in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                transforms.append(partial(_shifted, rows=rows, cols=cols))
        else:
            raise UsageError(f"unknown test-time augmentation {view!r}; choose from {list(TTA_VIEWS)}")
    return transforms


def _pixels(batch: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    step = max(1, round(SHIFT_FRACTION * min(batch.shape[-2:])))
    return rows * step, cols * step


def parse_tta(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``None`` -> no TTA (identity only); ``"identity,hflip"`` or a list -> those views, validated."""
    if spec is None:
        return ("identity",)
    views = tuple(v.strip() for v in (spec.split(",") if isinstance(spec, str) else spec) if v.strip())
    if not views:
        raise UsageError(f"empty test-time augmentation list; choose from {list(TTA_VIEWS)}")
    view_transforms(views)  # validates the names
    if len(set(views)) != len(views):
        raise UsageError(f"test-time augmentation {list(views)} names a view twice")
    return views
