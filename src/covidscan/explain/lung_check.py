"""Where a 2D CT model looks: the share of its Grad-CAM mass that falls outside the lungs.

A model that learned the disease looks at the lung parenchyma; one that learned the source looks at
borders, burnt-in text or the body outline (DeGrave et al., Nat Mach Intell 2021). The lungs come
from :func:`covidscan.data.lung.lung_mask_2d` (8-bit slices, no HU needed), the maps from
:func:`covidscan.explain.explain_image`, i.e. the same inference path as everything else.
``covidscan evaluate --cam-lung N`` writes the summary into the evaluation report and
``covidscan data shortcuts SRC --cam-run RUN`` into the shortcut audit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from covidscan.data.io import read_image
from covidscan.data.lung import LungFocus, lung_mask_2d
from covidscan.data.records import Sample
from covidscan.explain.cam import CamMethod
from covidscan.explain.explanation import explain_image
from covidscan.inference import Predictor

# a mean share outside the lungs from which the evaluation report warns (the lungs cover roughly a
# quarter to a third of a chest CT slice, so a model that ignores them scores around 0.7)
CAM_OUTSIDE_WARNING = 0.5


def cam_outside_lung_share(cam: np.ndarray, image01: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Share of a CAM's mass that falls outside the lungs of ``image01`` (NaN when no lungs are found
    or the map is all zero). The map is resized to the image when their shapes differ."""
    cam = np.clip(np.asarray(cam, dtype=np.float64), 0, None)
    mask = lung_mask_2d(image01) if mask is None else mask
    if cam.shape != mask.shape:
        cam = np.asarray(
            Image.fromarray(cam.astype(np.float32), mode="F").resize(mask.shape[::-1], Image.Resampling.BILINEAR),
            dtype=np.float64,
        )
    total = float(cam.sum())
    if not mask.any() or total <= 0:
        return float("nan")
    return float(cam[~mask].sum() / total)


def summarize_shares(shares: Sequence[float]) -> dict[str, Any]:
    values = np.asarray([s for s in shares if np.isfinite(s)], dtype=np.float64)
    return {
        "n_images": len(shares),
        "n_measured": int(values.size),  # lungs found and a non-zero map
        "mean_outside_share": float(values.mean()) if values.size else None,
        "median_outside_share": float(np.median(values)) if values.size else None,
    }


def cam_lung_check(
    loaded: Predictor,
    samples: Sequence[Sample],
    *,
    method: CamMethod = "gradcam",
    max_images: int = 100,
    seed: int = 0,
    explain: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Grad-CAM mass outside the lungs over (a seeded sample of up to ``max_images``) 2D test images
    of a model (a :class:`covidscan.inference.Predictor`, as ``load_predictor(run)`` gives):
    near 0 means the model looks at the lungs; a large share means it looks
    elsewhere (borders, text, the body outline) — a shortcut."""
    explain = explain or explain_image
    chosen = list(samples)
    if len(chosen) > max_images:
        pick = np.random.default_rng(seed).choice(len(chosen), max_images, replace=False)
        chosen = [chosen[i] for i in np.sort(pick)]
    data_config = loaded.members[0].config.data
    lung_mode = data_config.lung
    shares = []
    for sample in chosen:
        image = read_image(sample.path, data_config.window)
        cam = explain(loaded, image, method).map
        # with data.lung: crop the map covers the crop, so the share is measured on the crop
        seen = LungFocus("crop")(image) if lung_mode == "crop" else image
        shares.append(cam_outside_lung_share(cam, seen))
    return {"method": method, "data_lung": lung_mode, **summarize_shares(shares)}
