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

from covidscan.runtime import atomic_path

SAMPLE_CLASSES = ("COVID", "normal")
SAMPLE_VERSION = 2  # bump when the generator changes, so a cached older sample is not reused


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    """One synthetic patient's body and lung geometry: patients differ, as real ones do, so the
    leakage audit sees different patients as different images."""
    return {
        "body_w": rng.uniform(0.36, 0.48),
        "body_h": rng.uniform(0.28, 0.42),
        "tilt": rng.uniform(-0.35, 0.35),
        "lung_dx": rng.uniform(0.13, 0.22),
        "lung_w": rng.uniform(0.09, 0.16),
        "lung_h": rng.uniform(0.18, 0.3),
        "cy": rng.uniform(0.42, 0.58),
        "body_level": rng.uniform(0.4, 0.7),
    }


def _slice(rng: np.random.Generator, size: int, covid: bool, anatomy: dict[str, float], z: float) -> np.ndarray:
    """One axial slice at relative height ``z`` in [0, 1]: lungs grow towards the middle of the scan."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cos, sin = np.cos(anatomy["tilt"]), np.sin(anatomy["tilt"])
    u, v = (xx - 0.5) * cos + (yy - 0.5) * sin, -(xx - 0.5) * sin + (yy - 0.5) * cos
    body = (u / anatomy["body_w"]) ** 2 + (v / anatomy["body_h"]) ** 2 < 1
    image = np.where(body, anatomy["body_level"], 0.02)
    lung_scale = 0.75 + 0.25 * np.sin(np.pi * z)
    for side in (-1, 1):
        lu = u - side * anatomy["lung_dx"]
        lv = v - (anatomy["cy"] - 0.5)
        lung = (lu / (anatomy["lung_w"] * lung_scale)) ** 2 + (lv / (anatomy["lung_h"] * lung_scale)) ** 2 < 1
        image = np.where(lung, 0.12, image)
        if covid:
            for _ in range(rng.integers(2, 5)):
                bu, bv = side * anatomy["lung_dx"] + rng.normal(0, 0.05), anatomy["cy"] - 0.5 + rng.normal(0, 0.1)
                radius = rng.uniform(0.03, 0.06)
                blob = np.exp(-(((u - bu) ** 2 + (v - bv) ** 2) / (2 * radius**2)))
                image = image + np.where(lung, 0.35 * blob, 0)
    image = image + rng.normal(0, 0.03, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_sample_dataset(
    root: str | Path, *, patients_per_class: int = 12, slices_per_patient: int = 4, size: int = 96, seed: int = 0
) -> Path:
    """Write the synthetic set under ``root`` (class folders + ``manifest.csv``); return the manifest."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for label in SAMPLE_CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for patient in range(patients_per_class):
            patient_id = f"{label}-p{patient:02d}"
            anatomy = _anatomy(rng)
            for index in range(slices_per_patient):
                relative = f"{label}/{patient_id} ({index}).png"
                z = (index + 0.5) / slices_per_patient
                Image.fromarray(_slice(rng, size, label == "COVID", anatomy, z)).save(root / relative)
                rows.append((relative, label, patient_id))
    manifest = root / "manifest.csv"
    with atomic_path(manifest) as tmp, tmp.open("w", newline="") as handle:  # written last: never half a set
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "patient_id"))
        writer.writerows(rows)
    return manifest


def ensure_sample_dataset(root: str | Path | None = None) -> Path:
    """Generate the demo set once into ``$COVIDSCAN_CACHE`` (default ``~/.cache/covidscan``)."""
    if root is None:
        cache = Path(os.environ.get("COVIDSCAN_CACHE", Path.home() / ".cache" / "covidscan"))
        root = cache / f"sample-ct-v{SAMPLE_VERSION}"
    manifest = Path(root) / "manifest.csv"
    return manifest if manifest.is_file() else make_sample_dataset(root)
