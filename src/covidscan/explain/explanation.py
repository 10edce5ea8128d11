"""Explaining a trained model's prediction on one image or scan, and on many files.

This is the layer between :func:`covidscan.explain.cam.compute_cam` and its users: it reads the
file, applies the model's own evaluation preprocessing (from the checkpoint), picks the explained
class by name, and renders the overlay. ``POST /v1/explain`` and ``covidscan explain`` both call it.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from covidscan.checkpoint import LoadedModel
from covidscan.data import DataError, Sample, read_image
from covidscan.data.io import IMAGE_EXTENSIONS, is_nifti, is_supported_file
from covidscan.errors import UsageError
from covidscan.explain.cam import CamMethod, compute_cam, normalize_maps
from covidscan.explain.overlay import render_montage, render_overlay, write_bytes
from covidscan.progress import progress as show_progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explanation:
    """A prediction and the map explaining it, ready to save or send."""

    map: np.ndarray  # float32 in [0, 1], the model input's spatial shape ((S, S), or (D, S, S) for a scan)
    probabilities: dict[str, float]  # class name -> probability (mean over stacks for a scan)
    predicted: str
    target: str  # the class the map explains (predicted unless another was asked for)
    method: str
    overlay_png_bytes: bytes = field(repr=False)


def explain_image(
    loaded: LoadedModel,
    image: str | Path | np.ndarray,
    method: CamMethod = "gradcam",
    target_class: str | int | None = None,
    *,
    layer: str | None = None,
    samples: int = 8,
    sigma: float = 0.1,
    cmap: str = "jet",
) -> Explanation:
    """Explain one input: a 2D image (path or (H, W) array in [0, 1]) for 2D models, or a scan
    (NIfTI file, DICOM series folder or folder of slice images) for 3D models."""
    target_index = class_index(loaded, target_class)
    options = dict(layer=layer, samples=samples, sigma=sigma)
    if loaded.model.spatial_dims == 3:
        pixels, cam, probabilities, target = _explain_scan(loaded, image, method, target_index, **options)
    else:
        pixels = (
            read_image(image, window=loaded.config.data.window)
            if isinstance(image, str | Path)
            else _checked_array(image, 2)
        )
        x = loaded.transform()(pixels)[None]
        result = compute_cam(loaded.model, x, method, target_class=target_index, **options)
        cam, probabilities, target = result.maps[0], loaded.probabilities(result.logits)[0], int(result.target[0])
    names = loaded.class_names
    predicted = int(probabilities.argmax())
    caption = f"{names[predicted]} {float(probabilities[predicted]):.1%}  ({_METHOD_TITLES[method]}"
    caption += f", map for {names[target]})" if target != predicted else ")"
    cam = cam.cpu().numpy().astype(np.float32)
    render = render_montage if cam.ndim == 3 else render_overlay
    return Explanation(
        map=cam,
        probabilities={n: float(p) for n, p in zip(names, probabilities)},
        predicted=names[predicted],
        target=names[target],
        method=method,
        overlay_png_bytes=render(pixels, cam, caption, cmap=cmap),
    )


def explain_files(
    loaded: LoadedModel,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    method: CamMethod = "gradcam",
    target_class: str | int | None = None,
    *,
    layer: str | None = None,
    samples: int = 8,
    sigma: float = 0.1,
    progress: bool = True,
) -> tuple[Path, dict[str, str]]:
    """Write ``<name>.png`` (overlay or montage) and ``<name>.npy`` (raw map) per input, plus
    ``explanations.csv``; return that CSV's path and ``{file: error}`` for inputs that failed."""
    class_index(loaded, target_class)  # a wrong class name fails before any file is read
    out_dir = Path(out_dir)
    files = list_volume_inputs(inputs) if loaded.model.spatial_dims == 3 else list_image_inputs(inputs)
    rows: list[dict[str, object]] = []
    failures: dict[str, str] = {}
    for path, stem in show_progress(
        list(zip(files, _unique_stems(files))), desc="explain", unit="input", leave=True, disable=not progress
    ):
        try:
            explanation = explain_image(loaded, path, method, target_class, layer=layer, samples=samples, sigma=sigma)
        except DataError as exc:
            failures[str(path)] = str(exc)
            logger.warning("skipped %s", exc)
            continue
        buffer = io.BytesIO()
        np.save(buffer, explanation.map)
        write_bytes(out_dir / f"{stem}.npy", buffer.getvalue())
        write_bytes(out_dir / f"{stem}.png", explanation.overlay_png_bytes)
        rows.append(
            {
                "file": str(path),
                "overlay": f"{stem}.png",
                "map": f"{stem}.npy",
                "predicted": explanation.predicted,
                "target": explanation.target,
                "method": method,
                **{f"p_{name}": round(p, 6) for name, p in explanation.probabilities.items()},
            }
        )
    return _write_summary(out_dir / "explanations.csv", rows, loaded.class_names), failures


def class_index(loaded: LoadedModel, target_class: str | int | None) -> int | None:
    """Class name (case-insensitive) or index -> index, with the valid names in the error."""
    names = loaded.class_names
    if target_class is None:
        return None
    if isinstance(target_class, int) and 0 <= target_class < len(names):
        return target_class
    lowered = [name.lower() for name in names]
    if isinstance(target_class, str) and target_class.lower() in lowered:
        return lowered.index(target_class.lower())
    raise UsageError(f"unknown class {target_class!r}; this model's classes are {names}")


def list_image_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files and folders (searched recursively) -> supported image files, missing inputs kept so
    they are reported by name with the other bad files."""
    files: list[Path] = []
    for item in map(Path, inputs):
        files.extend(
            sorted(p for p in item.rglob("*") if p.is_file() and is_supported_file(p)) if item.is_dir() else [item]
        )
    if not files:
        raise DataError(f"no supported images among {[str(i) for i in inputs]}")
    return files


def list_volume_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """NIfTI files and scan folders (DICOM series or slice images); a folder of scans is searched."""
    scans: list[Path] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            scans.append(item)
            continue
        candidates = [item, *sorted(p for p in item.rglob("*") if p.is_dir())]
        scans.extend(
            folder
            for folder in candidates
            if any(f.suffix.lower() in _SCAN_SLICE_SUFFIXES for f in folder.iterdir() if f.is_file())
        )
        scans.extend(sorted(p for p in item.rglob("*") if p.is_file() and is_nifti(p)))
    if not scans:
        raise DataError(f"no NIfTI files or DICOM series among {[str(i) for i in inputs]}")
    return scans


_SCAN_SLICE_SUFFIXES = IMAGE_EXTENSIONS | {".dcm", ".dicom"}
_METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "smoothgradcampp": "Smooth Grad-CAM++"}


def _checked_array(array: np.ndarray, ndim: int = 2) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != ndim:
        raise DataError(f"expected a {ndim}D grayscale array in [0, 1], got shape {array.shape}")
    return array


def _explain_scan(
    loaded: LoadedModel, scan: str | Path, method: CamMethod, target_index: int | None, **options
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, int]:
    """Explain a scan stack by stack, with the 3D data pipeline the model was trained with.

    The scan's class is the mean of its stacks' probabilities; every stack is explained for that
    class, and the raw maps are stitched (max where stacks overlap) before one normalisation, so
    slices stay comparable across stacks. Returns the preprocessed (D, S, S) scan for display.
    """
    from covidscan.data.volumes import VolumeStackDataset

    if not isinstance(scan, str | Path):
        raise DataError(
            "3D models explain scans given by path (NIfTI file, DICOM series folder or folder of "
            "slice images), not arrays"
        )
    dataset = VolumeStackDataset([Sample(str(scan), None)], [], loaded.config.data, train=False)
    volume = dataset.scan_volume(0).numpy()
    stacks = torch.stack([dataset[i][0] for i in range(len(dataset))])
    probabilities = torch.as_tensor(loaded.predict_batch(stacks)).mean(0)
    target = int(probabilities.argmax()) if target_index is None else target_index
    maps = compute_cam(loaded.model, stacks, method, target_class=target, normalize=False, **options).maps.cpu()
    depth, slices = loaded.config.data.depth, volume.shape[0]
    if slices < depth:  # one stack, edge-padded symmetrically by VolumeStackDataset.stack
        front = (depth - slices) // 2
        return volume, normalize_maps(maps[:1, front : front + slices])[0], probabilities, target
    stitched = torch.zeros((slices, *maps.shape[2:]), dtype=maps.dtype)
    for (_, start), stack_map in zip(dataset.stacks, maps):
        stitched[start : start + depth] = torch.maximum(stitched[start : start + depth], stack_map)
    return volume, normalize_maps(stitched[None])[0], probabilities, target


def _unique_stems(files: list[Path]) -> list[str]:
    """Output names from input names; same-named files in different folders get a numeric suffix."""
    seen: dict[str, int] = {}
    stems = []
    for path in files:
        stem = path.name if path.is_dir() else path.name.removesuffix(".gz").rsplit(".", 1)[0]
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _write_summary(path: Path, rows: list[dict[str, object]], class_names: list[str]) -> Path:
    fields = ["file", "overlay", "map", "predicted", "target", "method", *(f"p_{n}" for n in class_names)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_bytes(path, buffer.getvalue().encode())
