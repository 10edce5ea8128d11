"""Explaining a trained model's prediction on one image or scan, and on many files.

This is the layer between :func:`covidscan.explain.cam.compute_cam` and its users: it takes a
:class:`~covidscan.inference.Predictor` (the one inference path), reads the file, applies each
model's own evaluation preprocessing, picks the explained class by name, and renders the overlay.
``POST /v1/explain`` and ``covidscan explain`` both call it. CAMs need gradients, so the predictor
must hold PyTorch models: an ONNX export alone is refused with the reason. For an ensemble, every
member explains the ensemble's class and the maps (each normalised, resized to the first member's
input) are averaged.
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
import torch.nn.functional as F
from torch import nn

from covidscan.data import DataError, Sample, StudySource, find_studies, list_inputs, open_study, read_image
from covidscan.errors import UsageError
from covidscan.explain.cam import CamMethod, compute_cam, normalize_maps
from covidscan.explain.overlay import empty_map_warning, render_montage, render_overlay, write_bytes
from covidscan.inference import Predictor
from covidscan.inference.predictor import Member
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
    warning: str | None = None  # e.g. an all-zero map, which the overlay also notes


def explain_image(
    predictor: Predictor,
    image: str | Path | np.ndarray | StudySource,
    method: CamMethod = "gradcam",
    target_class: str | int | None = None,
    *,
    layer: str | None = None,
    samples: int = 8,
    sigma: float = 0.1,
    cmap: str = "jet",
) -> Explanation:
    """Explain one input: a 2D image (path or (H, W) array in [0, 1]) for 2D models, or a study for
    3D models (DICOM series folder or zip — its axial CT series —, NIfTI file, folder of slice images)."""
    predictor.require_explainable()
    target_index = class_index(predictor, target_class)
    options = dict(layer=layer, samples=samples, sigma=sigma)
    if predictor.spatial_dims == 3:
        pixels, cam, probabilities, target = _explain_scan(predictor, image, method, target_index, **options)
    else:
        if isinstance(image, StudySource):
            raise UsageError(f"{image.path}: a 2D model explains images, not whole studies")
        pixels = (
            read_image(image, window=predictor.config.data.window, limits=predictor.config.data.limits)
            if isinstance(image, str | Path)
            else _checked_array(image, 2)
        )
        cam, probabilities, target = _explain_pixels(predictor, pixels, method, target_index, **options)
    names = predictor.class_names
    predicted = int(probabilities.argmax())
    caption = f"{names[predicted]} {float(probabilities[predicted]):.1%}  ({_METHOD_TITLES[method]}"
    caption += f", map for {names[target]})" if target != predicted else ")"
    cam_map = cam.cpu().numpy().astype(np.float32)
    render = render_montage if cam_map.ndim == 3 else render_overlay
    return Explanation(
        map=cam_map,
        probabilities={n: float(p) for n, p in zip(names, probabilities)},
        predicted=names[predicted],
        target=names[target],
        method=method,
        overlay_png_bytes=render(pixels, cam_map, caption, cmap=cmap),
        warning=empty_map_warning(cam_map, _METHOD_TITLES[method], names[target]),
    )


def _cam_model(member: Member) -> nn.Module:
    """The PyTorch module Grad-CAM differentiates; an exported (ONNX) member has none."""
    if member.explain_model is None:
        raise UsageError(f"{member.source}: Grad-CAM needs the PyTorch checkpoint, not an exported model")
    return member.explain_model


def _explain_pixels(
    predictor: Predictor, pixels: np.ndarray, method: CamMethod, target_index: int | None, **options
) -> tuple[torch.Tensor, np.ndarray, int]:
    """(S, S) map, class probabilities and explained class for one decoded 2D image."""
    views = [view[None] for view in predictor.preprocess(pixels)]
    probabilities = predictor.predict_batch(views)[0]
    target = int(probabilities.argmax()) if target_index is None else target_index
    maps = [
        compute_cam(_cam_model(member), views[view], method, target_class=target, **options).maps
        for member, view in zip(predictor.members, predictor.member_views)
    ]
    return _mean_map(maps)[0], probabilities, target


def _mean_map(maps: list[torch.Tensor]) -> torch.Tensor:
    """One model's normalised map as is; several: each resized to the first one's shape, averaged, renormalised."""
    if len(maps) == 1:
        return maps[0]
    shape = maps[0].shape[1:]
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    resized = [
        m if m.shape[1:] == shape else F.interpolate(m[:, None], size=shape, mode=mode, align_corners=False)[:, 0]
        for m in maps
    ]
    return normalize_maps(torch.stack(resized).mean(0))


def explain_files(
    predictor: Predictor,
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
    predictor.require_explainable()
    class_index(predictor, target_class)  # a wrong class name fails before any file is read
    out_dir = Path(out_dir)
    # 3D: every study under the inputs (covidscan.data.find_studies); 2D: every image file
    inputs_found: list[Path | StudySource] = [
        *(
            find_studies(inputs, predictor.config.data.limits)
            if predictor.spatial_dims == 3
            else list_inputs(list(inputs))
        )
    ]
    paths = [item.path if isinstance(item, StudySource) else item for item in inputs_found]
    rows: list[dict[str, object]] = []
    failures: dict[str, str] = {}
    for item, path, stem in show_progress(
        list(zip(inputs_found, paths, _unique_stems(paths))),
        desc="explain",
        unit="input",
        leave=True,
        disable=not progress,
    ):
        try:
            explanation = explain_image(
                predictor, item, method, target_class, layer=layer, samples=samples, sigma=sigma
            )
        except DataError as exc:
            failures[str(path)] = str(exc)
            logger.warning("skipped %s", exc)
            continue
        if explanation.warning:
            logger.warning("%s: %s", path, explanation.warning)
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
                "warning": explanation.warning or "",
            }
        )
    return _write_summary(out_dir / "explanations.csv", rows, predictor.class_names), failures


def class_index(predictor: Predictor, target_class: str | int | None) -> int | None:
    """Class name (case-insensitive) or index -> index, with the valid names in the error."""
    names = predictor.class_names
    if target_class is None:
        return None
    if isinstance(target_class, int) and 0 <= target_class < len(names):
        return target_class
    lowered = [name.lower() for name in names]
    if isinstance(target_class, str) and target_class.lower() in lowered:
        return lowered.index(target_class.lower())
    raise UsageError(f"unknown class {target_class!r}; this model's classes are {names}")


_METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "smoothgradcampp": "Smooth Grad-CAM++"}


def _checked_array(array: np.ndarray, ndim: int = 2) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim != ndim:
        raise DataError(f"expected a {ndim}D grayscale array in [0, 1], got shape {array.shape}")
    return array


def _explain_scan(
    predictor: Predictor,
    scan: str | Path | np.ndarray | StudySource,
    method: CamMethod,
    target_index: int | None,
    **options,
) -> tuple[np.ndarray, torch.Tensor, np.ndarray, int]:
    """Explain a scan stack by stack, with the 3D data pipeline the model was trained with.

    The scan's class is the mean of its stacks' probabilities; every stack is explained for that
    class, and the raw maps are stitched (max where stacks overlap) before one normalisation, so
    slices stay comparable across stacks. Returns the preprocessed (D, S, S) scan for display.
    """
    from covidscan.data.volumes import VolumeStackDataset

    if not isinstance(scan, str | Path | StudySource):
        raise DataError(
            "3D models explain scans given by path (NIfTI file, DICOM series folder or zip, folder of "
            "slice images), not arrays"
        )
    with open_study(scan, limits=predictor.config.data.limits) as opened:
        datasets = [
            VolumeStackDataset([Sample(str(opened.scan), None)], [], view.data, train=False) for view in predictor.views
        ]
        stacks = [torch.stack([dataset[i][0] for i in range(len(dataset))]) for dataset in datasets]
        volume = datasets[0].scan_volume(0).numpy()
    probabilities = predictor.predict_batch(stacks).mean(0)
    target = int(probabilities.argmax()) if target_index is None else target_index
    maps = []
    for member, view in zip(predictor.members, predictor.member_views):
        raw = compute_cam(_cam_model(member), stacks[view], method, target_class=target, normalize=False, **options)
        maps.append(_stitch(raw.maps.cpu(), datasets[view]))
    return volume, _mean_map(maps)[0], probabilities, target


def _stitch(maps: torch.Tensor, dataset) -> torch.Tensor:
    """Per-stack raw maps -> one (1, D, S, S) map of the whole scan, normalised once."""
    depth, slices = dataset.config.depth, dataset.scan_volume(0).shape[0]  # cached: not decoded again
    if slices < depth:  # one stack, edge-padded symmetrically by VolumeStackDataset.stack
        front = (depth - slices) // 2
        return normalize_maps(maps[:1, front : front + slices])
    stitched = torch.zeros((slices, *maps.shape[2:]), dtype=maps.dtype)
    for (_, start), stack_map in zip(dataset.stacks, maps):
        stitched[start : start + depth] = torch.maximum(stitched[start : start + depth], stack_map)
    return normalize_maps(stitched[None])


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
    fields = ["file", "overlay", "map", "predicted", "target", "method", *(f"p_{n}" for n in class_names), "warning"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_bytes(path, buffer.getvalue().encode())
