"""Discover samples from a folder-per-class tree, a CSV manifest, or the embedded demo sample."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

from covidscan.data.io import DICOM_EXTENSIONS, is_supported_file
from covidscan.data.records import DataError, Sample, SampleSet

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label", "patient_id", "split")
# Other names public manifests use for the same columns (case-insensitive); the first match wins.
COLUMN_ALIASES = {
    "path": ("path", "filepath", "file_path", "filename", "file_name", "file", "image", "image_path"),
    "label": ("label", "class", "class_name", "target", "diagnosis"),
    "patient_id": ("patient_id", "patientid", "patient", "subject_id", "subject", "case_id"),
    "split": ("split", "subset", "fold_name", "partition"),
}
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}


def canonical_split(name: str) -> str:
    """``Validation`` -> ``val`` etc.; unknown names are returned lower-cased for the caller to reject."""
    name = name.strip().lower()
    return SPLIT_ALIASES.get(name, name)


_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def _is_series_folder(folder: Path) -> bool:
    """A folder whose files are DICOM slices is one series (one scan, one patient)."""
    return any(p.is_file() and p.suffix.lower() in DICOM_EXTENSIONS for p in folder.iterdir())


def _split_dirs(root: Path) -> list[Path]:
    """``root/train``, ``root/val``, ``root/test`` when the tree is already split (e.g. covid19-xray)."""
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if subdirs and all(canonical_split(p.name) in SPLIT_NAMES for p in subdirs):
        return sorted(subdirs)
    return []


def discover_folder(root: str | Path, *, skip_bad: bool = False) -> tuple[list[Sample], list[tuple[str, str]]]:
    """``root/<class>/<file>`` images, or ``root/<class>/<patient>/`` DICOM series folders.

    A series folder's name becomes its patient id. A tree split as ``root/{train,val,test}/<class>/``
    keeps that split (``predefined``). Unknown file types are an error naming the file (or skipped
    and listed with ``skip_bad``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    split_dirs = _split_dirs(root)
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    if split_dirs:
        for split_dir in split_dirs:
            in_split, bad = discover_folder(split_dir, skip_bad=skip_bad)
            samples += [s.with_split(canonical_split(split_dir.name)) for s in in_split]
            skipped += bad
        return samples, skipped
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders; expected {root}/<class name>/<images>")
    for class_dir in class_dirs:
        found = 0
        for entry in sorted(class_dir.iterdir()):
            if entry.name in _IGNORED_NAMES or entry.name.startswith("."):
                continue
            if entry.is_dir():
                if _is_series_folder(entry):
                    samples.append(Sample(str(entry), class_dir.name, patient_id=entry.name))
                    found += 1
                continue
            if not is_supported_file(entry):
                reason = f"unknown file type {entry.suffix!r}"
                if not skip_bad:
                    raise DataError(f"{entry}: {reason}; remove it, convert it, or pass --skip-bad")
                skipped.append((str(entry), reason))
                continue
            samples.append(Sample(str(entry), class_dir.name))
            found += 1
        if found == 0:
            message = f"{class_dir}: class folder '{class_dir.name}' holds no images"
            if not skip_bad:
                raise DataError(message + "; add images, delete the folder, or pass --skip-bad")
            skipped.append((str(class_dir), "empty class folder"))
    return samples, skipped


def read_manifest(path: str | Path, *, skip_bad: bool = False) -> tuple[list[Sample], list[tuple[str, str]]]:
    """CSV with columns ``path,label[,patient_id][,split]``; relative paths are relative to the CSV."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rename = _manifest_columns(path, reader.fieldnames or [])
        samples, skipped = [], []
        for line, row in enumerate(reader, start=2):
            row = {rename.get((k or "").strip(), ""): (v or "").strip() for k, v in row.items()}
            file = Path(row["path"])
            if not file.is_absolute():
                file = path.parent / file
            split = canonical_split(row.get("split") or "") or None
            problem = None
            if not row["path"]:
                problem = "empty path"
            elif not file.exists():
                problem = f"file not found: {file}"
            elif split is not None and split not in SPLIT_NAMES:
                problem = f"split {split!r} is not one of {list(SPLIT_NAMES)}"
            if problem:
                if not skip_bad:
                    raise DataError(f"{path}, line {line}: {problem}; fix the row or pass --skip-bad")
                skipped.append((str(file), problem))
                continue
            samples.append(Sample(str(file), row["label"] or None, row.get("patient_id") or None, split))
    return samples, skipped


def _manifest_columns(path: Path, header: Sequence[str]) -> dict[str, str]:
    """Map the CSV's own column names to path/label/patient_id/split (see ``COLUMN_ALIASES``)."""
    lowered = {name.strip().lower(): name.strip() for name in header if name}
    rename = {}
    for column, aliases in COLUMN_ALIASES.items():
        match = next((lowered[a] for a in aliases if a in lowered), None)
        if match is not None:
            rename[match] = column
    missing = [c for c in ("path", "label") if c not in rename.values()]
    if missing:
        raise DataError(
            f"{path}: manifest lacks column(s) {missing}; expected header "
            f"path,label[,patient_id][,split] (or aliases such as filename/class/patient), "
            f"got {[h.strip() for h in header]}; rename the columns"
        )
    return rename


def parse_label_map(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    """``["CT_NonCOVID=non-COVID", ...]`` (CLI form) or a mapping -> ``{raw: class}``."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    mapping = {}
    for item in items:
        raw, sep, name = item.partition("=")
        if not sep or not raw.strip() or not name.strip():
            raise DataError(f"label map entry {item!r} must look like RAW=CLASS, e.g. CT_NonCOVID=non-COVID")
        mapping[raw.strip()] = name.strip()
    return mapping


def load_samples(
    source: str | Path,
    *,
    classes: list[str] | None = None,
    label_map: dict[str, str] | None = None,
    skip_bad: bool = False,
    max_per_class: int | None = None,
    require_labels: bool = True,
) -> SampleSet:
    """Load a dataset description: folder tree, CSV manifest, or ``"sample"`` (embedded demo).

    ``label_map`` renames raw labels (e.g. ``CT_NonCOVID -> non-COVID``) so external datasets line
    up with a model's classes; ``classes`` fixes the class order (else sorted discovery order).
    """
    if str(source) == "sample":
        from covidscan.data.sample import ensure_sample_dataset

        source = ensure_sample_dataset()
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        samples, skipped = read_manifest(source, skip_bad=skip_bad)
    elif source.is_dir():
        samples, skipped = discover_folder(source, skip_bad=skip_bad)
    else:
        raise DataError(
            f"{source}: data source must be a folder of class sub-folders or a .csv manifest "
            "(path,label[,patient_id][,split]); not found or not one of those"
        )
    if label_map:
        samples = [
            Sample(s.path, label_map.get(s.label, s.label) if s.label else None, s.patient_id, s.split) for s in samples
        ]
    if not samples:
        raise DataError(f"{source}: no usable samples found")
    present = sorted({s.label for s in samples if s.label is not None})
    if require_labels:
        unlabeled = [s.path for s in samples if s.label is None]
        if unlabeled:
            raise DataError(
                f"{unlabeled[0]}: no label ({len(unlabeled)} unlabeled rows); training and "
                "evaluation need a label for every sample"
            )
    if classes is not None:
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DataError(
                f"{source}: labels {unknown} are not among the classes {classes}; map them with "
                "data.label_map (e.g. --label-map CT_NonCOVID=non-COVID) or drop them"
            )
        class_names = list(classes)
    else:
        class_names = present
    if require_labels and len(present) < 2:
        raise DataError(f"{source}: only one class ({present}) present; a classifier needs at least two")
    if max_per_class is not None:
        kept: dict[str, int] = {}
        capped = []
        for s in samples:
            label = s.label or ""
            kept[label] = kept.get(label, 0) + 1
            if kept[label] <= max_per_class:
                capped.append(s)
        samples = capped
    if skipped:
        logger.warning("skipped %d bad input(s); first: %s (%s)", len(skipped), *skipped[0])
    return SampleSet(samples, class_names, skipped)


def list_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders given for prediction into a sorted list of supported files."""
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file() and is_supported_file(p)))
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: input not found")
    if not files:
        raise DataError(f"no supported images among {[str(i) for i in inputs]}")
    return files
