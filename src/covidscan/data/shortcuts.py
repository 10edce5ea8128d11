"""Shortcut audit: how well signals that are *not* pathology predict the label.

A model that scores 0.99 at home and 0.5 at the next hospital usually learned the source — image
size, compression, scanner borders, text burnt into the corners — instead of the disease (DeGrave
et al., Nat Mach Intell 2021). Before training anything, this audit asks each such signal alone:
a random forest (scikit-learn) sees only that signal, out-of-fold predictions come from
patient-grouped cross-validation (``StratifiedGroupKFold``) when patient ids exist and stratified
folds otherwise, and the out-of-fold ROC AUC (macro one-vs-rest for more than two classes) gets a
bootstrap 95% CI from covidscan's evaluation (patients resampled when known). A signal that
predicts the label well is a shortcut a CNN can take too.

Signals (:data:`SIGNALS`): image width, height and aspect, file size, JPEG quality (estimated from
the quantisation tables), bit depth / mode, an 8x8 thumbnail, the image border (a frame of a few
pixels) and the image outside the lungs only (lungs blacked out with
:func:`covidscan.data.lung.lung_mask_2d`). The first six come from file headers and are cheap; the
trainer checks those on the training split (:func:`warn_cheap_shortcuts`).

The model-level counterpart, :func:`covidscan.explain.lung_check.cam_lung_check`, measures how
much of a trained model's Grad-CAM mass falls outside the lungs (it lives in ``explain``, which may
import ``data``, not the other way round).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from covidscan.data.io import read_image
from covidscan.data.lung import lung_mask_2d
from covidscan.data.parallel import map_chunks, usable_cpus
from covidscan.data.readers.dicom import dicom_files, is_dicom_file
from covidscan.data.records import DataError, Sample, SampleSet

logger = logging.getLogger(__name__)

STRONG_SHORTCUT_AUC = 0.80
SHORTCUT_AUC = 0.65
WEAK_SHORTCUT_AUC = 0.55
_THUMBNAIL = 8
_BORDER_SIDE, _BORDER_WIDTH, _BORDER_BINS = 64, 3, 16
_OUTSIDE_SIDE = 16
_FEW_PATIENTS = 20  # fewer patients than this: say that the figures are fragile
# the IJG standard luminance table (JPEG Annex K), quality 50: libjpeg scales it for other qualities
_IJG_LUMINANCE_SUM = 3605  # sum of the IJG standard luminance table (JPEG Annex K), i.e. quality 50
_MODE_BITS = {"1": 1, "L": 8, "P": 8, "LA": 16, "RGB": 24, "RGBA": 32, "CMYK": 32, "YCbCr": 24, "I;16": 16, "I": 32}
_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "DICOM")


@dataclass(frozen=True)
class Signal:
    name: str
    description: str
    cheap: bool  # from file headers only (no pixel decoding)


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("width", "image width in pixels", True),
        Signal("height", "image height in pixels", True),
        Signal("aspect", "width / height", True),
        Signal("file_size", "file size in bytes", True),
        Signal("jpeg_quality", "JPEG quality estimated from the quantisation table (-1: not JPEG)", True),
        Signal("mode", "bit depth, channels and file format", True),
        Signal("header", "all of the above together", True),
        Signal("thumbnail", f"the whole image shrunk to {_THUMBNAIL}x{_THUMBNAIL} pixels", False),
        Signal("border", f"a {_BORDER_WIDTH}-pixel frame around the image (at {_BORDER_SIDE}x{_BORDER_SIDE})", False),
        Signal("outside_lungs", f"the image with the lungs blacked out, at {_OUTSIDE_SIDE}x{_OUTSIDE_SIDE}", False),
    )
}


def jpeg_quality(quantization: dict[int, Sequence[int]] | None) -> float:
    """libjpeg quality (1-100) that would produce this luminance table; -1 when there is none.

    Inverts the IJG scaling (quality q < 50: scale 5000/q %, else 200 - 2q %) with the ratio of the
    table's sum to the standard table's (independent of zigzag or natural order); tables from other
    encoders land on the nearest quality.
    """
    if not quantization or 0 not in quantization:
        return -1.0
    table = np.asarray(quantization[0], dtype=np.float64)
    if table.size != 64:
        return -1.0
    scale = 100.0 * float(table.sum()) / _IJG_LUMINANCE_SUM
    quality = 5000.0 / scale if scale > 100 else (200.0 - scale) / 2.0
    return float(np.clip(round(quality), 1, 100))


def header_features(path: str | Path) -> dict[str, np.ndarray]:
    """The cheap signals of one file, read from its header (PIL opens lazily; DICOM without pixels)."""
    path = Path(path)
    file_size = float(path.stat().st_size)
    quality: float
    if is_dicom_file(path):
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        width, height = float(ds.get("Columns", 0)), float(ds.get("Rows", 0))
        bits, channels, fmt, quality = (
            float(ds.get("BitsStored", 16)),
            float(ds.get("SamplesPerPixel", 1)),
            "DICOM",
            -1.0,
        )
    else:
        try:
            with Image.open(path) as image:
                width, height = float(image.width), float(image.height)
                bits = float(_MODE_BITS.get(image.mode, 8 * len(image.getbands())))
                channels, fmt = float(len(image.getbands())), image.format or ""
                quality = jpeg_quality(getattr(image, "quantization", None)) if fmt == "JPEG" else -1.0
        except OSError as exc:
            raise DataError(f"{path}: unreadable image ({exc}); remove it or pass --skip-bad") from exc
    fmt_code = float(_FORMATS.index(fmt)) if fmt in _FORMATS else float(len(_FORMATS))
    features = {
        "width": np.array([width]),
        "height": np.array([height]),
        "aspect": np.array([width / height if height else 0.0]),
        "file_size": np.array([file_size]),
        "jpeg_quality": np.array([quality], dtype=np.float64),
        "mode": np.array([bits, channels, fmt_code]),
    }
    features["header"] = np.concatenate(list(features.values()))
    return features


def _shrink(image01: np.ndarray, side: int) -> np.ndarray:
    pil = Image.fromarray(np.asarray(image01, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((side, side), Image.Resampling.BOX), dtype=np.float64)


def pixel_features(path: str | Path) -> dict[str, np.ndarray]:
    """The signals that need the pixels (read as covidscan reads them: [0, 1], DICOM lung-windowed)."""
    image = read_image(path)
    frame = _shrink(image, _BORDER_SIDE)
    w = _BORDER_WIDTH
    sides = [frame[:w].mean(0), frame[-w:].mean(0), frame[:, :w].mean(1), frame[:, -w:].mean(1)]
    border = np.concatenate([s.reshape(_BORDER_BINS, -1).mean(1) for s in sides])
    outside = np.where(lung_mask_2d(image), 0.0, image)
    return {
        "thumbnail": _shrink(image, _THUMBNAIL).ravel(),
        "border": border,
        "outside_lungs": _shrink(outside, _OUTSIDE_SIDE).ravel(),
    }


def _features_of(sample: Sample, names: tuple[str, ...]) -> dict[str, np.ndarray] | str:
    """Features of one sample, or the reason it could not be read (module level: it runs in workers)."""
    try:
        features = header_features(sample.path)
        if any(not SIGNALS[n].cheap for n in names):
            features.update(pixel_features(sample.path))
        return {n: features[n] for n in names}
    except DataError as exc:
        return str(exc)
    except Exception as exc:  # PIL/pydicom raise many types for corrupt files; listed, not fatal
        return f"{sample.path}: unreadable ({type(exc).__name__}: {exc})"


def _feature_chunk(samples: Sequence[Sample], names: tuple[str, ...]) -> list[dict[str, np.ndarray] | str]:
    return [_features_of(s, names) for s in samples]


def expand_series(sample_set: SampleSet) -> SampleSet:
    """DICOM series folders become their slices (same label; the series' patient id, or the folder)."""
    out: list[Sample] = []
    for s in sample_set.samples:
        path = Path(s.path)
        if path.is_dir():
            out += [replace(s, path=str(f), patient_id=s.patient_id or str(path)) for f in dicom_files(path)]
        else:
            out.append(s)
    return SampleSet(out, sample_set.class_names, sample_set.skipped, sample_set.issues)


def extract_features(
    samples: Sequence[Sample], names: Sequence[str], *, workers: int | None = None, progress: bool = True
) -> tuple[dict[str, np.ndarray], list[int], list[tuple[str, str]]]:
    """Feature matrices per signal for the readable samples, their indices, and the unreadable ones."""
    from covidscan.progress import progress as show_progress

    names = tuple(names)
    workers = workers or usable_cpus()
    chunk = 64
    expensive = any(not SIGNALS[n].cheap for n in names)
    results: list[dict[str, np.ndarray] | str] = []
    with show_progress(total=len(samples), desc="shortcut signals", unit="img", disable=not progress) as bar:
        if workers > 1 and expensive and len(samples) >= 4 * chunk:
            for part in map_chunks(_feature_chunk, samples, chunk, workers, names):
                results += part
                bar.update(len(part))
        else:
            for s in samples:
                results.append(_features_of(s, names))
                bar.update()
    features = {i: r for i, r in enumerate(results) if not isinstance(r, str)}
    kept = list(features)
    failed = [(samples[i].path, r) for i, r in enumerate(results) if isinstance(r, str)]
    matrices = {n: np.stack([features[i][n] for i in kept]) if kept else np.zeros((0, 1)) for n in names}
    return matrices, kept, failed


def _folds(y: np.ndarray, groups: np.ndarray | None, max_folds: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    smallest = int(np.bincount(y).min())
    if groups is not None:
        per_class = min(len(np.unique(groups[y == c])) for c in np.unique(y))
        k = min(max_folds, per_class)
        if k >= 2:
            return StratifiedGroupKFold(k, shuffle=True, random_state=seed), f"StratifiedGroupKFold({k}) by patient"
    k = min(max_folds, smallest)
    if k < 2:
        raise DataError("the shortcut audit needs at least 2 samples (patients) of every class")
    return StratifiedKFold(k, shuffle=True, random_state=seed), f"StratifiedKFold({k})"


def out_of_fold_proba(
    features: np.ndarray, y: np.ndarray, groups: np.ndarray | None, *, folds: int = 5, seed: int = 0, trees: int = 200
) -> tuple[np.ndarray, str]:
    """Out-of-fold class probabilities of a random forest that sees only ``features``."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    k = int(y.max()) + 1
    if np.ptp(features, axis=0).max(initial=0) == 0:  # a constant signal carries nothing: chance, exactly
        return np.full((len(y), k), 1.0 / k), "constant signal"
    cv, scheme = _folds(y, groups, folds, seed)
    forest = RandomForestClassifier(n_estimators=trees, min_samples_leaf=2, random_state=seed, n_jobs=1)
    # groups only for a patient-grouped splitter (StratifiedKFold warns that it ignores them)
    grouped = groups if isinstance(cv, StratifiedGroupKFold) else None
    proba = cross_val_predict(forest, features, y, groups=grouped, cv=cv, method="predict_proba")
    return proba, scheme


def verdict(auc: float | None) -> str:
    """Plain words for an out-of-fold AUC."""
    if auc is None:
        return "undefined"
    if auc >= STRONG_SHORTCUT_AUC:
        return "strong shortcut"
    if auc >= SHORTCUT_AUC:
        return "shortcut"
    return "weak" if auc >= WEAK_SHORTCUT_AUC else "none"


def _auc_with_ci(
    y: np.ndarray, proba: np.ndarray, class_names: list[str], samples: Sequence[Sample], n_bootstrap: int, seed: int
) -> tuple[float | None, float | None, float | None]:
    from covidscan.evaluation.bootstrap import bootstrap_metrics
    from covidscan.evaluation.metrics import PredictionSet, compute_metrics

    predictions = PredictionSet(y, proba, class_names, [s.path for s in samples], [s.patient_id for s in samples])
    name = "roc_auc" if len(class_names) == 2 else "macro_auroc"
    point = compute_metrics(predictions, positive=1)[name].value
    if point is None or n_bootstrap == 0:
        return point, None, None
    interval = bootstrap_metrics(predictions, positive=1, n_resamples=n_bootstrap, seed=seed)[name]
    return point, interval["ci_low"], interval["ci_high"]


def audit_shortcuts(
    sample_set: SampleSet,
    *,
    signals: Sequence[str] | None = None,
    folds: int = 5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """One row per signal: out-of-fold AUC [bootstrap 95% CI] of that signal alone, and a verdict."""
    names = tuple(signals or SIGNALS)
    unknown = [n for n in names if n not in SIGNALS]
    if unknown:
        raise DataError(f"unknown shortcut signal(s) {unknown}; choose from {list(SIGNALS)}")
    data = expand_series(sample_set)
    labelled = [s for s in data.samples if s.label is not None]
    if len({s.label for s in labelled}) < 2:
        raise DataError("the shortcut audit needs labelled samples of at least two classes")
    matrices, kept, failed = extract_features(labelled, names, workers=workers, progress=progress)
    samples = [labelled[i] for i in kept]
    class_names = [c for c in data.class_names if any(s.label == c for s in samples)]
    y = np.array([class_names.index(str(s.label)) for s in samples])
    has_patients = all(s.patient_id for s in samples)
    groups = np.array([s.patient_id for s in samples]) if has_patients else None
    rows = []
    scheme = ""
    for name in names:
        proba, scheme_used = out_of_fold_proba(matrices[name], y, groups, folds=folds, seed=seed)
        scheme = scheme if scheme_used == "constant signal" else scheme_used
        auc, low, high = _auc_with_ci(y, proba, class_names, samples, n_bootstrap, seed)
        rows.append(
            {
                "signal": name,
                "description": SIGNALS[name].description,
                "auc": auc,
                "ci_low": low,
                "ci_high": high,
                "verdict": verdict(auc),
                "note": "constant over the dataset" if scheme_used == "constant signal" else "",
            }
        )
    if not has_patients:
        caveat = (
            "no patient ids: images of one patient can fall on both sides of a fold, so a signal that identifies "
            "the patient (a crop size shared by one scan's slices, the thumbnail, the border) looks predictive "
            "even when it says nothing about the source; read the AUCs as upper bounds"
        )
    elif groups is not None and len(set(groups)) < _FEW_PATIENTS:
        caveat = (
            f"only {len(set(groups.tolist()))} patients: the CIs are wide, and an AUC below 0.5 is an artefact of "
            "holding out a large share of each class's patients per fold, not a signal"
        )
    else:
        caveat = ""
    return {
        "n_samples": len(samples),
        "n_patients": len(set(groups.tolist())) if groups is not None else None,
        "caveat": caveat,
        "classes": {c: int((y == i).sum()) for i, c in enumerate(class_names)},
        "cross_validation": scheme or "none (every signal constant)",
        "model": "random forest (200 trees) on the signal alone, out-of-fold predictions",
        "auc": "ROC AUC" if len(class_names) == 2 else "macro one-vs-rest ROC AUC",
        "bootstrap_resamples": n_bootstrap,
        "unreadable": [{"path": p, "reason": r} for p, r in failed],
        "signals": rows,
    }


def format_markdown(report: dict[str, Any], title: str = "Shortcut audit") -> str:
    """The report's table as Markdown (the JSON holds the details)."""
    lines = [
        f"## {title}",
        "",
        f"{report['n_samples']} images, {report['n_patients'] or 'no'} patient ids, classes {report['classes']}; "
        f"{report['cross_validation']}; {report['model']}; {report['auc']} with a "
        f"{report['bootstrap_resamples']}-resample bootstrap 95% CI.",
        "",
        *([f"Caveat: {report['caveat']}.", ""] if report.get("caveat") else []),
        "| signal | AUC [95% CI] | verdict |",
        "|---|---|---|",
    ]
    for row in report["signals"]:
        lines.append(f"| {row['signal']} ({row['description']}) | {format_auc(row)} | {row['verdict']} |")
    check = report.get("model_check")
    if check:
        share = check["mean_outside_share"]
        lines += [
            "",
            f"Model check ({check['run']}, {check['method']}): "
            + (
                f"on average {share:.0%} of the map's mass lies outside the lungs (median "
                f"{check['median_outside_share']:.0%}; {check['n_measured']} of {check['n_images']} test images "
                "measured)."
                if share is not None
                else f"not measured: no lungs found or all-zero maps on the {check['n_images']} test images."
            ),
        ]
    return "\n".join(lines) + "\n"


def format_auc(row: dict[str, Any]) -> str:
    if row["auc"] is None:
        return "undefined"
    if row["ci_low"] is None:
        return f"{row['auc']:.2f}"
    return f"{row['auc']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def plot_shortcuts(report: dict[str, Any], path: str | Path) -> Path:
    """Horizontal bars of each signal's AUC with its CI, verdict thresholds marked."""
    from matplotlib.figure import Figure

    rows = report["signals"]
    figure = Figure(figsize=(7, 0.45 * len(rows) + 1.5))
    axis = figure.subplots()
    aucs = [r["auc"] if r["auc"] is not None else 0.5 for r in rows]
    errors = np.array([[a - (r["ci_low"] or a), (r["ci_high"] or a) - a] for a, r in zip(aucs, rows)], dtype=float).T
    colours = ["#c0392b" if a >= SHORTCUT_AUC else "#e67e22" if a >= WEAK_SHORTCUT_AUC else "#7f8c8d" for a in aucs]
    positions = np.arange(len(rows))[::-1]
    axis.barh(positions, np.array(aucs) - 0.5, left=0.5, xerr=errors, color=colours, capsize=3)
    axis.set_yticks(positions, [r["signal"] for r in rows])
    for value, style in ((SHORTCUT_AUC, "--"), (STRONG_SHORTCUT_AUC, ":")):
        axis.axvline(value, color="black", linestyle=style, linewidth=1)
    axis.set_xlim(0.3, 1.0)
    axis.set_xlabel(f"{report['auc']} of the signal alone (0.5 = no information)")
    axis.set_title("How well non-pathology signals predict the label")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def cheap_shortcut_findings(
    sample_set: SampleSet, *, max_samples: int = 2000, seed: int = 0, threshold: float = SHORTCUT_AUC
) -> list[tuple[str, float]]:
    """Header-only signals whose out-of-fold AUC (no CI, 50 trees) reaches ``threshold`` on up to
    ``max_samples`` samples (a seeded random subset): fast enough to run before every training."""
    samples = [s for s in sample_set.samples if s.label is not None and not Path(s.path).is_dir()]
    if len({s.label for s in samples}) < 2:
        return []
    if len(samples) > max_samples:
        pick = np.random.default_rng(seed).choice(len(samples), max_samples, replace=False)
        samples = [samples[i] for i in np.sort(pick)]
    names = tuple(n for n, s in SIGNALS.items() if s.cheap)
    matrices, kept, _ = extract_features(samples, names, workers=1, progress=False)
    samples = [samples[i] for i in kept]
    classes = sorted({str(s.label) for s in samples})
    y = np.array([classes.index(str(s.label)) for s in samples])
    if len(classes) < 2 or np.bincount(y).min() < 2:
        return []
    groups = np.array([s.patient_id for s in samples]) if all(s.patient_id for s in samples) else None
    found = []
    for name in names:
        try:
            proba, _ = out_of_fold_proba(matrices[name], y, groups, seed=seed, trees=50)
        except DataError:
            return []
        auc, _, _ = _auc_with_ci(y, proba, classes, samples, 0, seed)
        if auc is not None and auc >= threshold:
            found.append((name, auc))
    return found


class ShortcutWarning(UserWarning):
    """A signal that is not pathology predicts the training labels."""


def warn_cheap_shortcuts(train: SampleSet, **kwargs: Any) -> list[tuple[str, float]]:
    """Warn once when a header-only signal alone predicts the training labels (AUC >= 0.65)."""
    from covidscan.notices import warn_once

    found = cheap_shortcut_findings(train, **kwargs)
    if found:
        listed = ", ".join(f"{name} (AUC {auc:.2f})" for name, auc in found)
        warn_once(
            f"shortcut:{listed}",
            f"shortcut signals in the training data: {listed} alone predict the label. A model can learn "
            "these instead of the disease and fail on data from elsewhere; run `covidscan data shortcuts` "
            "for the full audit (docs/data.md)",
            ShortcutWarning,
        )
    return found
