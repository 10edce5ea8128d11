"""Whole studies over HTTP: keep a predicted upload briefly for the viewer, and render its slices.

A study posted with ``keep=true`` (the web page does) stays on the server's disk for ``ttl`` seconds,
at most ``max_studies`` at a time (the oldest is deleted first), so the viewer can fetch slices in
either CT window and CAM heatmaps of the slices it shows; a study posted without it is deleted as
soon as its answer is sent. Kept studies are addressed by a random id and never listed.

Slices are read through the data layer's readers, in the order :func:`covidscan.inference.predict_study`
numbers its items (a DICOM series sorted by slice position, a NIfTI volume's slice axis), so slice
``k`` of the viewer is item ``k`` of the prediction.
"""

from __future__ import annotations

import io
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from covidscan.config import ReadLimits, WindowConfig
from covidscan.data import LUNG_WINDOW, apply_window, read_image
from covidscan.data.readers import get_reader
from covidscan.data.readers.base import Header
from covidscan.data.readers.dicom import DicomSeriesReader, read_dicom_header
from covidscan.data.volumes import slice_image_files
from covidscan.inference import StudyPrediction
from covidscan.serving.upload import UploadError

if TYPE_CHECKING:
    from covidscan.explain import Explanation

WINDOWS = {
    "lung": LUNG_WINDOW,
    "mediastinal": WindowConfig(level=40.0, width=400.0),
}


class StudySlices:
    """The slices of a predicted study, one at a time: HU for DICOM and NIfTI, [0, 1] for slice images."""

    def __init__(self, prediction: StudyPrediction, scan: Path, limits: ReadLimits | None = None) -> None:
        self.limits = limits or ReadLimits()
        self.scan = Path(scan)
        if prediction.source_files:  # the chosen series, validated and in slice order (item k = file k)
            self.kind = "dicom"
            files = tuple(prediction.source_files)
            first = read_dicom_header(files[0])
            self.header = Header((len(files), first.rows, first.columns), is_hu=True, files=files)
            self.count = len(files)
        elif self.scan.is_file():
            self.kind = "nifti"
            self.reader = get_reader(self.scan, volumetric=True)
            self.header = self.reader.header(self.scan, self.limits)
            self.count = self.header.shape[0]
        else:
            self.kind = "slices"
            self.files = slice_image_files(self.scan)
            self.count = len(self.files)

    @property
    def is_hu(self) -> bool:
        return self.kind != "slices"

    def pixels(self, index: int) -> np.ndarray:
        """Slice ``index``: HU (DICOM, NIfTI) or [0, 1] (slice images); 400 when out of range."""
        if not 0 <= index < self.count:
            raise UploadError(400, "invalid_argument", f"slice must be in 0..{self.count - 1}, got {index}")
        if self.kind == "dicom":
            return DicomSeriesReader().decode_slice(self.scan, self.header, index, self.limits)
        if self.kind == "nifti":
            return self.reader.read_slice(self.scan, index, self.limits)[0]
        return read_image(self.files[index], limits=self.limits)

    def windowed(self, index: int, window: WindowConfig) -> np.ndarray:
        """Slice ``index`` in [0, 1]: CT values through ``window``; slice images as they are."""
        pixels = self.pixels(index)
        return apply_window(pixels, window) if self.is_hu else pixels


@dataclass
class StoredStudy:
    folder: Path
    slices: StudySlices
    answer: dict[str, Any]
    created: float = field(default_factory=time.monotonic)
    scan_cams: dict[tuple[str, str | None], Explanation] = field(default_factory=dict)  # 3D: (method, class)


class StudyStore:
    """Kept studies, bounded in count and age; thread-safe (request handlers run in worker threads)."""

    def __init__(self, root: Path, max_studies: int = 4, ttl: float = 900.0) -> None:
        self.root, self.max_studies, self.ttl = Path(root), max_studies, ttl
        self.root.mkdir(parents=True, exist_ok=True)
        self._studies: dict[str, StoredStudy] = {}
        self._lock = threading.Lock()

    def new_folder(self) -> Path:
        return self.root / f"upload-{secrets.token_hex(8)}"

    def keep(self, folder: Path, slices: StudySlices, answer: dict[str, Any]) -> str:
        study_id = secrets.token_urlsafe(16)
        with self._lock:
            self._expire()
            while len(self._studies) >= self.max_studies:
                oldest = min(self._studies, key=lambda key: self._studies[key].created)
                self._drop(oldest)
            self._studies[study_id] = StoredStudy(folder, slices, answer)
        return study_id

    def get(self, study_id: str) -> StoredStudy:
        with self._lock:
            self._expire()
            study = self._studies.get(study_id)
        if study is None:
            raise UploadError(
                404,
                "study_not_found",
                f"no kept study {study_id!r}: studies are kept {self.ttl / 60:.0f} minutes "
                f"(at most {self.max_studies}); POST it again to /v1/studies?keep=true",
            )
        return study

    def delete(self, study_id: str) -> bool:
        with self._lock:
            return self._drop(study_id)

    def close(self) -> None:
        with self._lock:
            for key in list(self._studies):
                self._drop(key)
        shutil.rmtree(self.root, ignore_errors=True)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._studies.items() if now - s.created > self.ttl]:
            self._drop(key)

    def _drop(self, study_id: str) -> bool:
        study = self._studies.pop(study_id, None)
        if study is not None:
            shutil.rmtree(study.folder, ignore_errors=True)
        return study is not None


def window_by_name(name: str) -> WindowConfig:
    if name not in WINDOWS:
        raise UploadError(400, "invalid_argument", f"window must be one of {sorted(WINDOWS)}, got {name!r}")
    return WINDOWS[name]


def gray_png(pixels01: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels01 * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap_png(cam: np.ndarray, shape: tuple[int, int], max_alpha: float = 0.6) -> bytes:
    """An RGBA PNG of a [0, 1] map stretched to ``shape`` (H, W): jet colours, opacity rising with the
    value, so the browser can lay it over the slice and toggle it."""
    from matplotlib import colormaps

    resized = Image.fromarray(np.asarray(cam, dtype=np.float32)).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    values = np.clip(np.asarray(resized), 0.0, 1.0)
    rgba = colormaps["jet"](values)
    rgba[..., 3] = max_alpha * values
    buffer = io.BytesIO()
    Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()
