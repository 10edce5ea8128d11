"""Pictures of class activation maps: heatmap over the grayscale slice, montages for volumes.

Figures are built with matplotlib's object API (no pyplot state), so the web API can render
from several threads at once.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from covidscan.runtime import atomic_path

HEATMAP_ALPHA = 0.6  # opacity at the map's maximum
MAX_MONTAGE_SLICES = 36


def render_overlay(image: np.ndarray, cam: np.ndarray, caption: str, *, cmap: str = "jet") -> bytes:
    """PNG of ``cam`` (any resolution) stretched over the (H, W) grayscale ``image`` in [0, 1]."""
    figure = Figure(figsize=(4.2, 4.6), layout="constrained")
    _draw(figure.add_subplot(), image, cam, cmap)
    figure.suptitle(caption, fontsize=10)
    _add_colorbar(figure, cmap)
    return _png(figure)


def render_montage(
    volume: np.ndarray, cam: np.ndarray, caption: str, *, cmap: str = "jet", max_slices: int = MAX_MONTAGE_SLICES
) -> bytes:
    """PNG grid of slice overlays for a (D, H, W) volume and its (D, h, w) map.

    Long scans show ``max_slices`` evenly spaced slices, each labelled with its index.
    """
    if volume.shape[0] != cam.shape[0]:
        raise ValueError(f"volume has {volume.shape[0]} slices but the map has {cam.shape[0]}")
    slices = np.unique(np.linspace(0, volume.shape[0] - 1, min(max_slices, volume.shape[0])).round().astype(int))
    columns = math.ceil(math.sqrt(len(slices)))
    rows = math.ceil(len(slices) / columns)
    figure = Figure(figsize=(2.0 * columns, 2.0 * rows + 0.6), layout="constrained")
    for position, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        if position < len(slices):
            index = slices[position]
            _draw(axes, volume[index], cam[index], cmap)
            axes.set_title(f"slice {index}", fontsize=8)
        else:
            axes.axis("off")
    figure.suptitle(caption, fontsize=11)
    _add_colorbar(figure, cmap)
    return _png(figure)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write atomically (temp + rename) so an interrupted run never leaves a truncated file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _draw(axes: Axes, image: np.ndarray, cam: np.ndarray, cmap: str) -> None:
    # a shared extent lays a low-resolution map exactly over the full-resolution slice
    extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
    axes.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, extent=extent)
    # opacity grows with relevance, so the anatomy stays visible where the map is near zero
    axes.imshow(
        cam,
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        alpha=HEATMAP_ALPHA * np.clip(cam, 0.0, 1.0) ** 0.5,
        extent=extent,
        interpolation="bilinear",
    )
    axes.axis("off")


def _add_colorbar(figure: Figure, cmap: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    colorbar = figure.colorbar(
        ScalarMappable(Normalize(0, 1), cmap=cmap), ax=figure.axes, shrink=0.6, location="bottom", aspect=30
    )
    colorbar.set_label("relevance to the explained class (normalised)", fontsize=8)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
