"""Discover samples from folder-per-class trees, CSV manifests, the embedded demo sample, or several
such sources at once (``data.source`` as a list), each sample tagged with its source's name.

Which files count as inputs is the reader registry's decision (:mod:`covidscan.data.readers`), so
a newly registered format is found here without changes. Manifests are checked as they are read
(:mod:`covidscan.data.checks`): duplicate paths, one path with two labels, NaN/empty labels and
missing patient ids are errors or loud warnings naming the rows.
"""

from __future__ import annotations

import copy
import csv
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from covidscan.config import ConfigError, ReadLimits, SourceConfig
from covidscan.data.checks import Entry, check_entries, is_missing, verify_readable
from covidscan.data.readers import find_reader, is_supported_file
from covidscan.data.records import DataError, Sample, SampleSet

if TYPE_CHECKING:
    from covidscan.config import RunConfig

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

SourceLike = str | Path | SourceConfig


def canonical_split(name: str) -> str:
    """``Validation`` -> ``val`` etc.; unknown names are returned lower-cased for the caller to reject."""
    name = name.strip().lower()
    return SPLIT_ALIASES.get(name, name)


_IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def _is_scan_folder(folder: Path) -> bool:
    """A folder some scan reader takes (a DICOM series) is one sample: one scan, one patient."""
    return find_reader(folder, volumetric=True) is not None


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
                if _is_scan_folder(entry):
                    samples.append(Sample(str(entry), class_dir.name, patient_id=entry.name))
                    found += 1
                continue
            if not is_supported_file(entry):
                reason = f"unknown file type {entry.suffix!r}" if entry.exists() else "broken link or unreadable entry"
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


def read_manifest(
    path: str | Path, *, skip_bad: bool = False, labelled: bool = True
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """CSV with columns ``path,label[,patient_id][,split]``; relative paths are relative to the CSV.

    NaN-like labels and patient ids (``""``, ``NaN``, ``NA``, ``null``...: what pandas writes for a
    missing value) are read as missing, never as a class called "NaN". ``labelled=False``: the label
    column may be absent (unlabelled images, e.g. a target site for domain adaptation).
    """
    entries, skipped = _manifest_entries(Path(path), skip_bad=skip_bad, labelled=labelled)
    return [entry.sample for entry in entries], skipped


def _manifest_entries(
    path: Path, *, skip_bad: bool, labelled: bool = True
) -> tuple[list[Entry], list[tuple[str, str]]]:
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rename = _manifest_columns(path, reader.fieldnames or [], required=("path", "label") if labelled else ("path",))
        entries, skipped = [], []
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
                problem = f"file not found: {file}" if not file.is_symlink() else f"broken link or symlink loop: {file}"
            elif split is not None and split not in SPLIT_NAMES:
                problem = f"split {split!r} is not one of {list(SPLIT_NAMES)}"
            if problem:
                if not skip_bad:
                    raise DataError(f"{path}, line {line}: {problem}; fix the row or pass --skip-bad")
                skipped.append((str(file), problem))
                continue
            label = None if is_missing(row.get("label") or "") else row["label"]
            patient = None if is_missing(row.get("patient_id") or "") else row["patient_id"]
            entries.append(Entry(Sample(str(file), label, patient, split), f"{path.name} line {line}"))
    return entries, skipped


def _manifest_columns(path: Path, header: Sequence[str], required: Sequence[str] = ("path", "label")) -> dict[str, str]:
    """Map the CSV's own column names to path/label/patient_id/split (see ``COLUMN_ALIASES``)."""
    lowered = {name.strip().lower(): name.strip() for name in header if name}
    rename = {}
    for column, aliases in COLUMN_ALIASES.items():
        match = next((lowered[a] for a in aliases if a in lowered), None)
        if match is not None:
            rename[match] = column
    missing = [c for c in required if c not in rename.values()]
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


def as_sources(source: SourceLike | Sequence[SourceLike]) -> list[SourceConfig]:
    """Any source spec (a path, ``"sample"``, a :class:`SourceConfig`, or a list of those) as named sources."""
    items = [source] if isinstance(source, str | Path | SourceConfig) else list(source)
    if not items:
        raise DataError("no data source given; pass a folder, a manifest or 'sample'")
    sources = [item if isinstance(item, SourceConfig) else SourceConfig(path=str(item)) for item in items]
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"several sources are named {repeated}; give each a distinct name")
    return sources


def source_label(source: SourceLike | Sequence[SourceLike]) -> str:
    """A one-line description of a source spec for reports: the path, or ``name + name`` for several."""
    if isinstance(source, str | Path):
        return str(source)
    return " + ".join(s.name for s in as_sources(source))


def _source_entries(source: SourceConfig, *, skip_bad: bool) -> tuple[list[Entry], list[tuple[str, str]]]:
    """One source's samples, tagged with its name and relabelled by its own label map."""
    if source.path == "sample":
        from covidscan.data.sample import ensure_sample_dataset

        path = ensure_sample_dataset()
    else:
        path = Path(source.path)
    if path.is_file() and path.suffix.lower() == ".csv":
        entries, skipped = _manifest_entries(path, skip_bad=skip_bad)
    elif path.is_dir():
        samples, skipped = discover_folder(path, skip_bad=skip_bad)
        entries = [Entry(s, s.path) for s in samples]
    else:
        raise DataError(
            f"{path}: data source must be a folder of class sub-folders or a .csv manifest "
            "(path,label[,patient_id][,split]); not found or not one of those"
        )
    mapping = source.label_map
    tagged = [
        Entry(
            Sample(
                e.sample.path,
                mapping.get(e.sample.label, e.sample.label) if e.sample.label else None,
                e.sample.patient_id,
                e.sample.split,
                source.name,
            ),
            e.where,
        )
        for e in entries
    ]
    return tagged, skipped


def cap_per_class(samples: Sequence[Sample], cap: int, seed: int = 0) -> list[Sample]:
    """At most ``cap`` samples per class within each source (capping across sources would keep only
    the first source's files), drawn at random with a fixed seed and kept in their input order. Not
    the first ``cap`` in path order: slices of one patient sort together, so those would often be a
    handful of patients."""
    kept: Counter[tuple[str | None, str]] = Counter()
    chosen = []
    for index in random.Random(seed).sample(range(len(samples)), len(samples)):
        key = (samples[index].source, samples[index].label or "")
        kept[key] += 1
        if kept[key] <= cap:
            chosen.append(index)
    return [samples[index] for index in sorted(chosen)]


def load_samples(
    source: SourceLike | Sequence[SourceLike],
    *,
    classes: list[str] | None = None,
    label_map: dict[str, str] | None = None,
    skip_bad: bool = False,
    max_per_class: int | None = None,
    require_labels: bool = True,
    limits: ReadLimits | None = None,
    check_files: Literal["none", "header", "decode"] | None = None,
) -> SampleSet:
    """Load a dataset: a folder tree, a CSV manifest, ``"sample"`` (embedded demo), or a list of
    sources (:class:`~covidscan.config.SourceConfig` or paths) loaded together.

    Every sample's ``source`` is its source's name (the folder name, or the manifest's folder, by
    default). A source's own ``label_map`` applies first, then ``label_map`` (e.g. ``CT_NonCOVID ->
    non-COVID``) so datasets line up with a model's classes; ``classes`` fixes the class order (else
    sorted). Manifest problems are errors or :class:`~covidscan.data.records.DataWarning` naming the
    rows, and are kept in ``SampleSet.issues``.

    ``max_per_class`` keeps that many samples of each class *in each source*, a fixed-seed random
    draw (:func:`cap_per_class`: a quick subset that still holds every source).

    Files are checked through their readers within ``limits`` (``check_files``): by default every
    header (cheap: a decompression bomb or an unreadable file is found before anything runs), and
    with ``skip_bad`` every file is decoded once, so a truncated or hostile file is skipped here
    rather than stopping a run later. Bad rows and files are refused naming them all, or with
    ``skip_bad`` skipped and listed in ``SampleSet.skipped``.
    """
    sources = as_sources(source)
    label_map = label_map or {}
    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    for spec in sources:
        found, bad = _source_entries(spec, skip_bad=skip_bad)
        entries += [e.relabelled(label_map) for e in found]
        skipped += bad
    where = source_label(source)
    entries, bad, issues = check_entries(entries, skip_bad=skip_bad, require_labels=require_labels)
    skipped += bad
    samples = [e.sample for e in entries]
    if not samples:
        raise DataError(f"{where}: no usable samples found")
    present = sorted({s.label for s in samples if s.label is not None})
    if classes is not None:
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DataError(
                f"{where}: labels {unknown} are not among the classes {classes}; map them with "
                "data.label_map (e.g. --label-map CT_NonCOVID=non-COVID) or drop them"
            )
        class_names = list(classes)
    else:
        class_names = present
    if max_per_class is not None:
        samples = cap_per_class(samples, max_per_class)
    check_files = check_files or ("decode" if skip_bad else "header")
    if check_files != "none":
        samples, unreadable = verify_readable(samples, decode=check_files == "decode", limits=limits)
        if unreadable and not skip_bad:
            listed = "; ".join(f"{path}: {reason}" for path, reason in unreadable[:3])
            more = f" (+{len(unreadable) - 3} more)" if len(unreadable) > 3 else ""
            raise DataError(
                f"{len(unreadable)} unreadable file(s) in {where}: {listed}{more}; fix or remove them, or pass "
                "--skip-bad (data.skip_bad: true) to skip and list them"
            )
        skipped += unreadable
        present = sorted({s.label for s in samples if s.label is not None})
    if require_labels and len(present) < 2:
        raise DataError(f"{where}: only one class ({present}) present; a classifier needs at least two")
    if skipped:
        logger.warning("skipped %d bad input(s); first: %s (%s)", len(skipped), *skipped[0])
    return SampleSet(samples, class_names, skipped, issues)


def select_sources(config: RunConfig, names: Sequence[str], *, test: Sequence[str] | None = None) -> RunConfig:
    """A copy of ``config`` that trains on the named sources only, and (``test``) tests on others.

    For leave-one-source-out validation: ``select_sources(cfg, ["covid-ct"], test=["sarscov2-ct"])``
    trains on covid-ct and evaluates on sarscov2-ct as ``data.test_source``. Names are those of
    ``data.source`` (see :attr:`~covidscan.config.DataConfig.sources`).
    """
    available = {s.name: s for s in config.data.sources}
    wanted = list(names) + list(test or [])
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise ConfigError(f"unknown source(s) {unknown}; data.source names are {list(available)}")
    if not names:
        raise ConfigError("select_sources needs at least one training source")
    selected = copy.deepcopy(config)
    selected.data.source = [copy.deepcopy(available[n]) for n in names]
    if test is not None:
        selected.data.test_source = [copy.deepcopy(available[n]) for n in test] or None
    return selected


def list_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders given for prediction into a sorted list of supported files."""
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file() and is_supported_file(p)))
        elif item.is_file():
            files.append(item)
        elif item.is_symlink():
            raise DataError(f"{item}: broken symbolic link or symlink loop; point it at a real file or folder")
        else:
            raise DataError(f"{item}: input not found")
    if not files:
        raise DataError(f"no supported images among {[str(i) for i in inputs]}")
    return files
