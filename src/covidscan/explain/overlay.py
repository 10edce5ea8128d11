"""Pictures of class activation maps: heatmap over the grayscale slice, montages for volumes.

Figures are built with matplotlib's object API (no pyplot state), so the web API can render
from several threads at once. A map with no relevance anywhere (all zero once normalised: every
weighted activation was <= 0, or the map was flat) would draw as the bare image, indistinguishable
from "nothing interesting here"; such overlays carry a note saying so (:func:`empty_map_warning`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from covidscan.runtime import atomic_path

HEATMAP_ALPHA = 0.6  # opacity at the map's maximum
MAX_MONTAGE_SLICES = 36
EMPTY_MAP_NOTE = "all-zero map:\nno region raised\nthe class score"


def is_empty_map(cam: np.ndarray) -> bool:
    """True when a normalised map has no relevance anywhere (nothing to draw)."""
    cam = np.asarray(cam)
    return cam.size == 0 or not bool(np.any(np.nan_to_num(cam) > 0))


def empty_map_warning(cam: np.ndarray, method: str, target: str) -> str | None:
    """The warning to give with an all-zero ``cam`` of ``method`` explaining class ``target``, else None."""
    if not is_empty_map(cam):
        return None
    return (
        f"the {method} map for {target!r} is all zero: no region of the explained layer raised that class's "
        "score (every weighted activation was <= 0, or the map was flat), so the overlay shows no heat. "
        "This says nothing about where the model looks; try Grad-CAM++ or Smooth Grad-CAM++, another layer, "
        "or another class"
    )


def render_overlay(image: np.ndarray, cam: np.ndarray, caption: str, *, cmap: str = "jet") -> bytes:
    """PNG of ``cam`` (any resolution) stretched over the (H, W) grayscale ``image`` in [0, 1]; an
    all-zero map gets a note on the image instead of silently showing no heat."""
    figure = Figure(figsize=(4.2, 4.6), layout="constrained")
    axes = figure.add_subplot()
    _draw(axes, image, cam, cmap)
    if is_empty_map(cam):
        _note_empty(axes)
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
    if is_empty_map(cam):
        figure.text(0.5, 0.5, EMPTY_MAP_NOTE.replace("\n", " "), **_NOTE_STYLE)
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


_NOTE_STYLE: dict[str, Any] = {
    "ha": "center",
    "va": "center",
    "fontsize": 11,
    "color": "white",
    "bbox": {"boxstyle": "round", "facecolor": "firebrick", "alpha": 0.85},
}


def _note_empty(axes: Axes) -> None:
    axes.text(0.5, 0.5, EMPTY_MAP_NOTE, transform=axes.transAxes, **_NOTE_STYLE)


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
