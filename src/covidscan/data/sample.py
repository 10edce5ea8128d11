"""The embedded demo dataset: synthetic chest-CT-like slices generated on first use.

COVID slices carry peripheral ground-glass opacities (soft bright blobs inside the lungs); normal
slices do not. Several slices per synthetic patient, listed in a manifest with patient ids, so the
demo exercises the patient-grouped split just like real data.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_CLASSES = ("COVID", "normal")


def _slice(rng: np.random.Generator, size: int, covid: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.38) ** 2 < 1
    image = np.where(body, 0.55, 0.02)
    for cx in (0.32, 0.68):
        lung = ((xx - cx + rng.normal(0, 0.01)) / 0.14) ** 2 + ((yy - 0.5) / 0.27) ** 2 < 1
        image = np.where(lung, 0.12, image)
        if covid:
            for _ in range(rng.integers(2, 5)):
                bx, by = cx + rng.normal(0, 0.06), 0.5 + rng.normal(0, 0.12)
                radius = rng.uniform(0.03, 0.06)
                blob = np.exp(-(((xx - bx) ** 2 + (yy - by) ** 2) / (2 * radius**2)))
                image = image + np.where(lung, 0.35 * blob, 0)
    image = image + rng.normal(0, 0.03, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_sample_dataset(root: str | Path, *, patients_per_class: int = 12, slices_per_patient: int = 4,
                        size: int = 96, seed: int = 0) -> Path:
    """Write the synthetic set under ``root`` (class folders + ``manifest.csv``); return the manifest."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for label in SAMPLE_CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for patient in range(patients_per_class):
            patient_id = f"{label}-p{patient:02d}"
            for index in range(slices_per_patient):
                relative = f"{label}/{patient_id} ({index}).png"
                Image.fromarray(_slice(rng, size, label == "COVID")).save(root / relative)
                rows.append((relative, label, patient_id))
    manifest = root / "manifest.csv"
    tmp = manifest.with_suffix(".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "patient_id"))
        writer.writerows(rows)
    tmp.replace(manifest)  # the manifest appears last, so a half-written set is never used
    return manifest


def ensure_sample_dataset(root: str | Path | None = None) -> Path:
    """Generate the demo set once into ``$COVIDSCAN_CACHE`` (default ``~/.cache/covidscan``)."""
    if root is None:
        root = Path(os.environ.get("COVIDSCAN_CACHE", Path.home() / ".cache" / "covidscan")) / "sample-ct"
    manifest = Path(root) / "manifest.csv"
    return manifest if manifest.is_file() else make_sample_dataset(root)
