"""Train/val/test splits that do not leak patients, reproducible from a seed and saved with every run.

Methods (``data.split.method``):

- ``stratified``: random split by ``ratios``, class proportions kept (scikit-learn
  ``train_test_split``). A zero ratio leaves that split empty (study E's 70/30 is ``[0.7, 0, 0.3]``).
- ``grouped``: the same, but whole patients are assigned, so no patient is in two splits. Each
  patient is stratified by its majority label, so ratios hold in patients, not exactly in images.
  Samples without a patient id count as their own patient.
- ``kfold``: fold ``fold`` of ``folds`` is the **test** split (``StratifiedGroupKFold`` with patients,
  ``StratifiedKFold`` without); val is carved from the remaining folds with the share
  ``ratios[1] / (ratios[0] + ratios[1])`` (none when ``ratios[1]`` is 0).
- ``predefined``: the manifest's ``split`` column (or ``train/``, ``test/`` folders) is kept; when it
  names no val split and ``ratios[1] > 0``, val is carved from train as above.
- ``file``: reload a ``splits.csv`` written by :func:`save_splits` (e.g. an earlier run's).
- ``auto``: ``predefined`` when every sample has a split, else ``grouped`` when patient ids are
  known, else ``stratified`` with a once-only warning that patients may leak.

With several sources (``Sample.source``), patients are grouped *within* their source (patient
``7`` of two hospitals are two people), and ``stratify_by_source`` stratifies by label x source,
so every split keeps each source's class mix. One source splits exactly as before.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidscan.config import SplitConfig
from covidscan.data.records import DataError, Sample, SampleSet
from covidscan.data.sources import SPLIT_NAMES
from covidscan.notices import warn_once
from covidscan.runtime import atomic_path

logger = logging.getLogger(__name__)

SPLITS_COLUMNS = ("path", "label", "patient_id", "split", "source")


class LeakageWarning(UserWarning):
    """A split or dataset property that may let test information reach training."""


def warn_leakage_once(key: str, message: str) -> None:
    """Leakage checks warn once per process (see :mod:`covidscan.notices`), not once per epoch or fold."""
    warn_once(key, message, LeakageWarning, stacklevel=4)


def resolve_method(sample_set: SampleSet, method: str) -> str:
    """What ``auto`` means for this data: predefined > grouped > stratified."""
    if method != "auto":
        return method
    if sample_set.samples and all(s.split for s in sample_set.samples):
        return "predefined"
    return "grouped" if sample_set.has_patients() else "stratified"


def assign_splits(sample_set: SampleSet, split_config: SplitConfig, seed: int) -> SampleSet:
    """Return a copy of ``sample_set`` where every sample has ``split`` in train/val/test."""
    if not sample_set.samples:
        raise DataError("cannot split an empty sample set")
    method = resolve_method(sample_set, split_config.method)
    samples = sample_set.samples
    ratios = tuple(split_config.ratios)
    by_source = split_config.stratify_by_source
    if method in ("stratified", "kfold") and not sample_set.has_patients():
        warn_leakage_once(
            "no-patients",
            "no patient ids: a random split may put slices of one patient in both train and "
            "test (e.g. sarscov2-ct), inflating accuracy. Give a manifest with patient_id to get a "
            "patient-grouped split, and run `covidscan data audit` to check near-duplicates",
        )
    if method == "stratified":
        names = _ratio_split(_labels(samples, by_source), ratios, seed)
    elif method == "grouped":
        if not sample_set.has_patients():
            raise DataError(
                "split method 'grouped' needs patient ids (a manifest with a patient_id column); "
                "use 'stratified' for data without patients"
            )
        names = _ratio_split(_labels(samples, by_source), ratios, seed, groups=_groups(samples))
    elif method == "kfold":
        names = _kfold_split(samples, split_config, seed)
    elif method == "predefined":
        names = _predefined_split(samples, ratios, seed, by_source)
    elif method == "file":
        assert split_config.file is not None  # SplitConfig requires it for method "file"
        return _apply_file(sample_set, Path(split_config.file))
    else:
        raise DataError(f"unknown split method {method!r}")
    split_set = replace(sample_set, samples=[s.with_split(n) for s, n in zip(samples, names)])
    logger.info("split (%s, seed %d): %s", method, seed, split_counts(split_set))
    return split_set


def split_counts(sample_set: SampleSet) -> dict[str, int]:
    counts = Counter(s.split for s in sample_set.samples)
    return {name: counts.get(name, 0) for name in SPLIT_NAMES}


def _labels(samples: Sequence[Sample], by_source: bool = False) -> np.ndarray:
    """What a split is stratified by: the label, or label x source."""
    if by_source:
        return np.array([f"{s.label or ''}\x1f{s.source or ''}" for s in samples])
    return np.array([s.label or "" for s in samples])


def _groups(samples: Sequence[Sample]) -> np.ndarray:
    """Patient id per sample, within its source when there are several (the same id in two sources is
    two people); a sample without one is its own group (keyed by path)."""
    several = len({s.source for s in samples}) > 1
    return np.array([(f"{s.source}\x1f" if several else "") + (s.patient_id or f"path:{s.path}") for s in samples])


def _two_way(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Boolean mask of the ``share`` part, stratified when every class can be split."""
    from sklearn.model_selection import train_test_split  # ~100 MB: only splitting needs it, not inference

    index = np.arange(len(labels))
    if share <= 0 or len(labels) == 0:
        return np.zeros(len(labels), bool)
    try:
        _, picked = train_test_split(index, test_size=share, random_state=seed, stratify=labels)
    except ValueError as exc:  # a class with one member, or fewer picked samples than classes
        warn_leakage_once(
            f"unstratified-{len(labels)}-{share}",
            f"split could not be stratified ({exc}); falling back to a plain random split",
        )
        _, picked = train_test_split(index, test_size=share, random_state=seed)
    mask = np.zeros(len(labels), bool)
    mask[picked] = True
    return mask


def _majority_labels(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique groups (in first-seen order) and the most common label of each."""
    unique, _first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    votes: dict[int, Counter] = {}
    for g, label in zip(inverse, labels):
        votes.setdefault(int(g), Counter())[label] += 1
    group_labels = np.array(
        [sorted(votes[g].items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for g in range(len(unique))]
    )
    return inverse, group_labels


def _ratio_split(labels: np.ndarray, ratios: Sequence[float], seed: int, groups: np.ndarray | None = None) -> list[str]:
    """Split names by (train, val, test) ratios; whole groups move together when given."""
    if groups is not None:
        inverse, unit_labels = _majority_labels(labels, groups)
    else:
        inverse, unit_labels = np.arange(len(labels)), labels
    train_r, val_r, test_r = ratios
    names = np.full(len(unit_labels), "train", dtype=object)
    is_test = _two_way(unit_labels, test_r, seed)
    names[is_test] = "test"
    rest = np.flatnonzero(~is_test)
    if val_r > 0:
        is_val = _two_way(unit_labels[rest], val_r / (train_r + val_r), seed)
        names[rest[is_val]] = "val"
    return list(names[inverse])


def _kfold_split(samples: Sequence[Sample], config: SplitConfig, seed: int) -> list[str]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = _labels(samples, config.stratify_by_source)
    has_groups = any(s.patient_id for s in samples)
    groups = _groups(samples) if has_groups else None
    splitter = (StratifiedGroupKFold if has_groups else StratifiedKFold)(
        n_splits=config.folds, shuffle=True, random_state=seed
    )
    try:
        folds = list(splitter.split(np.zeros(len(samples)), labels, groups))
    except ValueError as exc:
        raise DataError(f"cannot make {config.folds} folds: {exc}; lower data.split.folds") from exc
    _, test_index = folds[config.fold]
    names = np.full(len(samples), "train", dtype=object)
    names[test_index] = "test"
    train_r, val_r, _ = config.ratios
    rest = np.flatnonzero(names == "train")
    if val_r > 0:
        names[rest] = _ratio_split(
            labels[rest], (train_r, val_r, 0.0), seed, groups=groups[rest] if groups is not None else None
        )
    return list(names)


def _predefined_split(samples: Sequence[Sample], ratios: Sequence[float], seed: int, by_source: bool) -> list[str]:
    missing = [s.path for s in samples if not s.split]
    if missing:
        raise DataError(
            f"split method 'predefined' needs a split for every sample; {len(missing)} have none "
            f"(first: {missing[0]}). Fill the manifest's split column or choose another method"
        )
    names = np.array([s.split for s in samples], dtype=object)
    train_r, val_r, _ = ratios
    if "val" not in set(names) and val_r > 0:
        rest = np.flatnonzero(names == "train")
        train_samples = [samples[int(i)] for i in rest]
        groups = _groups(train_samples) if any(s.patient_id for s in train_samples) else None
        names[rest] = _ratio_split(_labels(train_samples, by_source), (train_r, val_r, 0.0), seed, groups=groups)
        logger.info("predefined split has no val part: carved %d val samples from train", int((names == "val").sum()))
    return list(names)


def _key(path: str) -> str:
    return str(Path(path).resolve())


def _apply_file(sample_set: SampleSet, path: Path) -> SampleSet:
    """Re-use a saved split: every sample must appear in the file with the same label."""
    saved = {_key(s.path): s for s in load_splits(path).samples}
    assigned, missing = [], []
    for s in sample_set.samples:
        row = saved.get(_key(s.path))
        if row is None:
            missing.append(s.path)
            continue
        if row.label != s.label:
            raise DataError(
                f"{path}: {s.path} is labelled {row.label!r} there but {s.label!r} in the data; "
                "the splits file belongs to another version of this dataset"
            )
        assert row.split is not None  # load_splits rejects a row without one
        assigned.append(s.with_split(row.split))
    if missing:
        raise DataError(
            f"{path}: {len(missing)} sample(s) of the data are not in this splits file (first: "
            f"{missing[0]}); re-split with another method or regenerate the file"
        )
    return replace(sample_set, samples=assigned)


def save_splits(sample_set: SampleSet, path: str | Path) -> Path:
    """Write ``path,label,patient_id,split,source`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLITS_COLUMNS)
        for s in sample_set.samples:
            writer.writerow((s.path, s.label or "", s.patient_id or "", s.split or "", s.source or ""))
    return Path(path)


def load_splits(path: str | Path) -> SampleSet:
    """Read a ``splits.csv``; class names are the sorted labels found in it. Files written before the
    ``source`` column existed load too (their samples have no source)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: splits file not found; pass a splits.csv written by `covidscan data split` "
            "or a run directory's splits.csv"
        )
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("path", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: lacks column(s) {missing}; expected {','.join(SPLITS_COLUMNS)}")
        samples = []
        for line, row in enumerate(reader, start=2):
            split = (row.get("split") or "").strip()
            if split not in SPLIT_NAMES:
                raise DataError(f"{path}, line {line}: split {split!r} is not one of {list(SPLIT_NAMES)}")
            samples.append(
                Sample(
                    row["path"],
                    (row.get("label") or "").strip() or None,
                    (row.get("patient_id") or "").strip() or None,
                    split,
                    (row.get("source") or "").strip() or None,
                )
            )
    if not samples:
        raise DataError(f"{path}: no rows")
    return SampleSet(samples, sorted({s.label for s in samples if s.label}))
