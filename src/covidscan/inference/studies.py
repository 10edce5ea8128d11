"""Whole-study prediction: a CT study in, one verdict out, with the per-slice (or per-stack) evidence.

A *study* (a DICOM series folder or zip, a NIfTI volume, a folder of slice images) is found and
opened by the data layer (:mod:`covidscan.data.studies`: safe zip extraction, the axial CT series
chosen by its tags and the choice explained). 2D models predict every slice (or every
``every``-th); 3D models predict the slice stacks of their training pipeline
(:class:`covidscan.data.volumes.VolumeStackDataset`). The item probabilities are aggregated into the
study's by a recorded rule:

- ``mean``: the mean of the items' class probabilities;
- ``max``: per class, the largest item probability, renormalised to sum to 1 (what
  ``covidscan evaluate --aggregation max`` does per patient);
- ``topk``: per class, the mean of the ``top_k`` largest item probabilities, renormalised (``max`` is
  ``top_k=1``; robust to one stray slice, sensitive to a small lesion).

Patient identifiers are never in an output unless asked for (``include_identifiers=True``). Items
whose model output is not finite are left out of the aggregate with a warning (never given a
label); a study none of whose items is usable is refused. Data warnings raised while the study is
read (uneven slice spacing: slices may be missing) go into the verdict's warnings, where a reader of
the result sees them, not only into a log. Every verdict carries the research-use
warning and the model's provenance (id, version, checkpoint SHA-256, engine, TTA).
"""

from __future__ import annotations

import warnings as py_warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from covidscan.data import (
    LUNG_WINDOW,
    DataError,
    DataWarning,
    Sample,
    SeriesInfo,
    apply_window,
    read_image,
    read_volume,
)
from covidscan.data.readers import get_reader
from covidscan.data.readers.base import check_finite
from covidscan.data.studies import StudySource, ZipLimits, open_study
from covidscan.data.volumes import VolumeStackDataset, slice_image_files
from covidscan.errors import UsageError
from covidscan.inference.predictor import NonFiniteOutputError, Predictor
from covidscan.notices import RESEARCH_USE_NOTICE

Aggregation = Literal["mean", "max", "topk"]
AGGREGATIONS: tuple[str, ...] = ("mean", "max", "topk")
DEFAULT_TOP_K = 5


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ItemPrediction:
    """One slice (2D models) or one slice stack (3D models) of a study."""

    index: int  # the slice index (2D) or the stack's first slice (3D), in the study's slice order
    last_index: int  # the last slice the item covers (= index for a slice)
    z_mm: float | None  # distance of ``index`` from the first slice along the slice axis; None if unknown
    probabilities: list[float] | None  # None when the model's output was not finite
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StudyPrediction:
    """The verdict on one study, the rule that made it, and everything needed to trust or check it.

    ``to_dict()`` is the JSON form (CLI ``--json``, ``POST /v1/studies``): no patient identifiers
    unless the prediction was made with ``include_identifiers=True``.
    """

    study: str  # the path given or found (folder, NIfTI file or zip)
    name: str
    class_names: list[str]
    probabilities: dict[str, float]
    predicted_label: str
    aggregation: str  # e.g. "mean", "max", "top-5 mean"
    unit: Literal["slice", "stack"]
    every: int  # 2D: every k-th slice was predicted
    items: list[ItemPrediction]
    series: dict[str, Any]  # UIDs, modality, slice count, spacing, and which series was chosen and why
    model: dict[str, Any]  # model_id, model_version, checkpoint_sha256, engine, tta, architecture
    warnings: list[str] = field(default_factory=list)
    # the chosen series' DICOM files, in slice order; empty for a zip (extracted to a folder that is gone)
    source_files: tuple[Path, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "name": self.name,
            "class_names": list(self.class_names),
            "probabilities": dict(self.probabilities),
            "predicted_label": self.predicted_label,
            "aggregation": self.aggregation,
            "unit": self.unit,
            "every": self.every,
            "n_items": len(self.items),
            "items": [item.to_dict() for item in self.items],
            "series": dict(self.series),
            "model": dict(self.model),
            "warnings": list(self.warnings),
        }


def aggregate(probabilities: np.ndarray, rule: Aggregation = "mean", top_k: int = DEFAULT_TOP_K) -> np.ndarray:
    """Item probabilities ``(N, K)`` -> one study probability vector ``(K,)`` by ``rule`` (module docstring)."""
    if rule not in AGGREGATIONS:
        raise UsageError(f"aggregation must be one of {list(AGGREGATIONS)}, got {rule!r}")
    if len(probabilities) == 0:
        raise DataError("no item to aggregate")
    if rule == "mean":
        return probabilities.mean(axis=0)
    k = 1 if rule == "max" else min(top_k, len(probabilities))
    if k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    top = np.sort(probabilities, axis=0)[-k:].mean(axis=0)
    return top / top.sum()


def aggregation_name(rule: Aggregation, top_k: int) -> str:
    return f"top-{top_k} mean" if rule == "topk" else rule


def _series_metadata(
    chosen: SeriesInfo | None, reason: str, spacing: tuple[float, ...] | None, slices: int, identifiers: bool
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "study_instance_uid": chosen.study_uid if chosen else None,
        "series_instance_uid": chosen.series_uid if chosen else None,
        "series_number": chosen.series_number if chosen else None,
        "series_description": chosen.description if chosen else None,
        "modality": chosen.modality if chosen else None,
        "image_type": list(chosen.image_type) if chosen else None,
        "orientation": chosen.plane if chosen else None,
        "slices": slices,
        "spacing_mm": list(spacing) if spacing else None,  # (z, y, x)
        "selection": reason,
    }
    if identifiers and chosen is not None:
        metadata["patient_id"] = chosen.patient_id
    return metadata


# ---------------------------------------------------------------------------------------------- prediction
def predict_study(
    predictor: Predictor,
    study: str | Path | StudySource,
    *,
    every: int = 1,
    aggregation: Aggregation = "mean",
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 16,
    include_identifiers: bool = False,
    zip_limits: ZipLimits | None = None,
) -> StudyPrediction:
    """Predict one study (a DICOM series folder or zip, a NIfTI file, a folder of slices, or a
    :class:`StudySource` from :func:`find_studies`) and aggregate its items into one verdict.

    2D models predict every ``every``-th slice, 3D models every slice stack of their training
    pipeline (``every`` does not apply). ``aggregation`` is ``mean``, ``max`` or ``topk`` (mean of
    the ``top_k`` highest per class). ``batch_size`` counts slices per forward pass (a 3D batch
    holds ``batch_size // depth`` stacks, at least one). Raises :class:`~covidscan.data.DataError` for a study that
    cannot be read, and :class:`NonFiniteOutputError` when no item gives a finite output.
    """
    if every < 1:
        raise UsageError(f"every must be >= 1, got {every}")
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    aggregate(np.full((1, 2), 0.5), aggregation, top_k)  # validates the rule before any file is read
    warnings: list[str] = [RESEARCH_USE_NOTICE]
    unit: Literal["slice", "stack"] = "slice" if predictor.spatial_dims == 2 else "stack"
    with py_warnings.catch_warnings(record=True) as raised:
        py_warnings.simplefilter("always", DataWarning)
        with open_study(study, limits=predictor.config.data.limits, zip_limits=zip_limits) as opened:
            given, scan = opened.given, opened.scan
            try:
                if unit == "slice":
                    items, spacing, slices = _predict_slices(predictor, scan, opened.kind, every, batch_size)
                else:
                    if every != 1:
                        warnings.append(
                            f"every={every} applies to 2D models; this 3D model predicts all its slice stacks"
                        )
                    items, spacing, slices = _predict_stacks(predictor, scan, batch_size)
                    every = 1
            except DataError as exc:
                raise DataError(str(exc).replace(str(scan), str(given)) if scan != given else str(exc)) from None
    for caught in raised:  # data warnings belong to this verdict; anything else is passed on unchanged
        if issubclass(caught.category, DataWarning):
            warnings.append(str(caught.message).replace(str(scan), str(given)))
        else:
            py_warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    if opened.skipped:
        names_left_out = ", ".join(member["name"] for member in opened.skipped[:5])
        warnings.append(f"{len(opened.skipped)} system files of the zip were left out ({names_left_out})")
    usable = [item for item in items if item.probabilities is not None]
    if not usable:
        raise NonFiniteOutputError(f"{given}: every {unit} gave a non-finite model output; no verdict")
    if len(usable) < len(items):
        warnings.append(
            f"{len(items) - len(usable)} of {len(items)} {unit}s gave a non-finite model output and were left out"
        )
    probabilities = aggregate(np.array([item.probabilities for item in usable]), aggregation, top_k)
    names = predictor.class_names
    return StudyPrediction(
        study=str(given),
        name=opened.name,
        class_names=names,
        probabilities={label: float(p) for label, p in zip(names, probabilities)},
        predicted_label=names[int(np.argmax(probabilities))],
        aggregation=aggregation_name(aggregation, top_k),
        unit=unit,
        every=every,
        items=items,
        series=_series_metadata(opened.series, opened.selection, spacing, slices, include_identifiers),
        model={**predictor.describe(), "architecture": predictor.card.architecture},
        warnings=warnings,
        source_files=opened.series.files if opened.series and not opened.extracted else (),
    )


def _items(
    predictor: Predictor, batch: list[list[torch.Tensor]], starts: list[int], ends: list[int], z: float | None
) -> list[ItemPrediction]:
    views = [torch.stack(view) for view in zip(*batch)]
    probabilities, errors = predictor.predict_items(views)
    return [
        ItemPrediction(
            start,
            end,
            None if z is None else round(start * z, 3),
            None if error else [float(p) for p in row],
            error,
        )
        for start, end, row, error in zip(starts, ends, probabilities, errors)
    ]


def _predict_slices(
    predictor: Predictor, scan: Path, kind: str, every: int, batch_size: int
) -> tuple[list[ItemPrediction], tuple[float, ...] | None, int]:
    """2D: window and preprocess every ``every``-th slice. A DICOM series is decoded slice by slice
    (memory: one slice, not the volume; skipped slices are never decoded); a NIfTI volume at once
    (slicing a gzipped file would decompress it again for every slice)."""
    limits = predictor.config.data.limits
    window = predictor.members[0].preprocessing.window or LUNG_WINDOW
    if kind == "slices":
        files = slice_image_files(scan)
        count, spacing = len(files), None

        def pixels(index: int) -> np.ndarray:
            return read_image(files[index], limits=limits)
    elif kind == "dicom":
        reader = get_reader(scan, volumetric=True)
        header = reader.header(scan, limits)  # validates the series and orders its files
        count, spacing = header.shape[0], header.spacing

        def pixels(index: int) -> np.ndarray:
            return apply_window(
                check_finite(header.files[index], reader.decode_slice(scan, header, index, limits)), window
            )
    else:
        volume = read_volume(scan, limits=limits)
        count, spacing = volume.hu.shape[0], volume.spacing

        def pixels(index: int) -> np.ndarray:
            return apply_window(volume.hu[index], window)

    z = spacing[0] if spacing else None

    items: list[ItemPrediction] = []
    indices = list(range(0, count, every))
    for first in range(0, len(indices), batch_size):
        chunk = indices[first : first + batch_size]
        items.extend(_items(predictor, [predictor.preprocess(pixels(i)) for i in chunk], chunk, chunk, z))
    return items, spacing, count


def _predict_stacks(
    predictor: Predictor, scan: Path, batch_size: int
) -> tuple[list[ItemPrediction], tuple[float, ...] | None, int]:
    """3D: the slice stacks of the training pipeline, one dataset per preprocessing view."""
    datasets = [VolumeStackDataset([Sample(str(scan), None)], [], view.data, train=False) for view in predictor.views]
    reference = datasets[0]
    slices = reference.scan_volume(0).shape[0]
    data = reference.config
    header = reference.headers[0]
    z = data.volume.z_spacing or header.z_spacing  # between the slices the model saw (after resampling)
    spacing = None
    if header.is_hu:  # DICOM / NIfTI: the scan's own (z, y, x) from its header
        spacing = get_reader(scan, volumetric=True).header(scan, data.limits).spacing
    items: list[ItemPrediction] = []
    stacks_per_batch = max(1, batch_size // data.depth)  # batch_size counts slices: a stack holds depth of them
    for first in range(0, len(reference), stacks_per_batch):
        chunk = range(first, min(first + stacks_per_batch, len(reference)))
        starts = [reference.stacks[i][1] for i in chunk]
        ends = [min(start + data.depth, slices) - 1 for start in starts]
        items.extend(_items(predictor, [[d[i][0] for d in datasets] for i in chunk], starts, ends, z))
    return items, spacing, slices
