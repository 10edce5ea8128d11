"""Lung masks for CT: from Hounsfield units (DICOM/NIfTI volumes) and from single 8-bit slices.

Why hand-written: the field's lung segmenters are deep models (``lungmask``'s U-Nets, TotalSegmentator)
whose weights are downloaded at run time, which an offline CPU machine cannot do, and they expect HU,
which a JPEG/PNG slice no longer has. The classical pipeline below — threshold, drop the air around
the patient, keep the largest dark regions inside the body, fill, close — is a handful of
``scipy.ndimage`` / ``scikit-image`` calls, works on any display window, and takes milliseconds.

* :func:`lung_mask` (3D, HU): air below -320 HU, not connected to the border of its slice, its two
  largest 3D components, holes filled per slice.
* :func:`lung_mask_2d` (one slice in [0, 1], no HU): the body is the bright region (Otsu) with its
  holes filled; the lungs are the pixels inside the body darker than a second Otsu threshold taken
  over the body alone, as the one or two largest components not touching the border, closed and
  filled so vessels and juxta-pleural opacities (the COVID findings) stay inside the mask.

Measured against the HU mask on the covid-ct-md-sample DICOM slices rendered to 8-bit (lung window):
see ``tests/test_lung.py`` and docs/data.md.
"""

from __future__ import annotations

import numpy as np

LUNG_THRESHOLD_HU = -320.0  # air-filled lung parenchyma lies below, soft tissue above
_MIN_LUNG_FRACTION = 0.005  # a dark region smaller than this share of the image is gas, not a lung
_SECOND_LUNG_RATIO = 0.1  # keep a second region only when it is at least this share of the first
_WORK_SIDE = 192  # larger slices are segmented at this size and the mask scaled back


def _largest_regions(labels: np.ndarray, sizes: np.ndarray, count: int = 2) -> np.ndarray:
    """Labels (1-based) of the ``count`` largest regions, the second only when comparable."""
    order = np.argsort(sizes)[::-1][:count]
    if len(order) == 0 or sizes[order[0]] <= 0:
        return np.zeros(0, np.int64)
    return np.array([i + 1 for i in order if sizes[i] > 0 and sizes[i] >= _SECOND_LUNG_RATIO * sizes[order[0]]])


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Labels touching the in-plane image border (the last two axes)."""
    edges = [labels[..., 0, :], labels[..., -1, :], labels[..., :, 0], labels[..., :, -1]]
    found = np.unique(np.concatenate([e.ravel() for e in edges]))
    return found[found > 0]


def lung_mask(hu: np.ndarray, threshold: float = LUNG_THRESHOLD_HU) -> np.ndarray:
    """Boolean (D, H, W) lung mask: air below ``threshold`` HU not connected to the border of its
    slice (outside air, the table), its two largest 3D components, holes (vessels) filled per slice."""
    from scipy import ndimage

    air = hu < threshold
    for plane in air:  # outside air, per slice: in 3D one open slice would join it to the lungs
        labels, _ = ndimage.label(plane)
        plane[np.isin(labels, _border_labels(labels))] = False
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros_like(air)
    sizes = np.asarray(ndimage.sum_labels(air, labels, index=np.arange(1, count + 1)))
    mask = np.isin(labels, _largest_regions(labels, sizes))
    return np.stack([ndimage.binary_fill_holes(plane) for plane in mask])


def lung_mask_2d(image01: np.ndarray) -> np.ndarray:
    """Boolean (H, W) lung mask of one CT slice given as display values in [0, 1] (8-bit JPEG/PNG
    or a windowed DICOM); all False when no lung-like region is found (e.g. a slice below the lungs)."""
    from scipy import ndimage

    image = np.asarray(image01, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"lung_mask_2d expects one (H, W) slice, got shape {image.shape}")
    scale = _WORK_SIDE / max(image.shape)
    if scale < 1:  # segment a reduced copy (lungs are large): milliseconds instead of most of a second
        small = ndimage.zoom(image, scale, order=1, grid_mode=True, mode="nearest")
        mask = _lung_mask_2d(small)
        factors = np.array(image.shape) / np.array(mask.shape)
        return ndimage.zoom(mask.astype(np.float32), factors, order=1, grid_mode=True, mode="nearest") > 0.5
    return _lung_mask_2d(image)


def _lung_mask_2d(image: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    empty = np.zeros(image.shape, bool)
    side = min(image.shape)
    if side < 16 or float(image.max() - image.min()) < 1e-3:
        return empty
    smooth = ndimage.gaussian_filter(image, sigma=max(side / 256, 0.5))
    # the body: brighter than the air around it; its largest region, with the lungs (holes) filled in
    bright = smooth > threshold_otsu(smooth)
    labels, count = ndimage.label(bright)
    if count == 0:
        return empty
    sizes = np.asarray(ndimage.sum_labels(bright, labels, index=np.arange(1, count + 1)))
    body = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    inside = smooth[body]
    if inside.size < 16 or float(inside.max() - inside.min()) < 1e-3:
        return empty
    # the lungs: the dark part of the body, away from the outside air
    dark = body & (smooth < threshold_otsu(inside))
    dark = ndimage.binary_opening(dark, structure=disk(max(1, round(side / 256))))
    labels, count = ndimage.label(dark)
    if count == 0:
        return empty
    sizes = np.asarray(ndimage.sum_labels(dark, labels, index=np.arange(1, count + 1)))
    sizes[_border_labels(labels) - 1] = 0
    sizes[sizes < _MIN_LUNG_FRACTION * image.size] = 0
    keep = _largest_regions(labels, sizes)
    if len(keep) == 0:
        return empty
    lungs = np.isin(labels, keep)
    radius = max(1, round(side / 64))
    padded = np.pad(lungs, radius)  # closing near the border must not shrink the mask there
    closed = ndimage.binary_closing(padded, structure=disk(radius))[radius:-radius, radius:-radius]
    return ndimage.binary_fill_holes(closed) & body


def lung_box(mask: np.ndarray, margin: float = 0.05) -> tuple[slice, slice]:
    """Square in-plane box around a (H, W) or (D, H, W) mask (all slices), with a margin, clipped
    to the image."""
    plane = mask.any(axis=0) if mask.ndim == 3 else mask
    rows, cols = np.nonzero(plane)
    height, width = plane.shape
    side = int(min(max(np.ptp(rows), np.ptp(cols)) * (1 + 2 * margin) + 1, height, width))
    boxes = []
    for centre, size in (((rows.min() + rows.max()) / 2, height), ((cols.min() + cols.max()) / 2, width)):
        start = int(np.clip(round(centre - side / 2), 0, size - side))
        boxes.append(slice(start, start + side))
    return boxes[0], boxes[1]


class LungFocus:
    """``data.lung`` for 2D inputs, on the [0, 1] image before the transform: ``crop`` to a square
    around the lungs, ``mask`` to black outside them, ``none`` to leave it. An image where no lung
    is found is used whole (and a warning says so once), so one slice below the lungs does not stop a
    run. A class, not a closure, so DataLoader worker processes can pickle it."""

    def __init__(self, mode: str) -> None:
        if mode not in ("none", "crop", "mask"):
            raise ValueError(f"lung mode must be 'none', 'crop' or 'mask', got {mode!r}")
        self.mode = mode

    def __call__(self, image01: np.ndarray) -> np.ndarray:
        if self.mode == "none":
            return image01
        mask = lung_mask_2d(image01)
        if not mask.any():
            from covidscan.notices import warn_once

            warn_once(
                "lung-not-found-2d",
                f"data.lung '{self.mode}': no lung region found in some images (not chest CT, or a slice "
                "outside the lungs); they are used whole",
            )
            return image01
        if self.mode == "mask":
            return np.where(mask, image01, 0.0).astype(np.float32)
        rows, cols = lung_box(mask)
        return np.ascontiguousarray(image01[rows, cols])

    def __repr__(self) -> str:
        return f"LungFocus({self.mode!r})"
