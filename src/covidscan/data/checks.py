"""Checks on a dataset before it is used: its rows (manifests) and its files (readers).

Row checks, after label maps, over all sources together:

- **missing labels**: ``""``, ``NaN``, ``NA``, ``null``... (pandas' missing values) never become a
  class; with labels required they are an error naming the rows, or skipped with ``skip_bad``;
- **duplicate paths** (spelled relative or absolute, through symlinks: paths are compared
  resolved): the first row is kept, the others dropped with a warning, so one image cannot land in
  train and test;
- **one path, different labels**: an error naming the rows, or all its rows skipped with ``skip_bad``;
- **missing patient ids** in a source whose other rows have them: a warning naming the rows, since
  each such row becomes its own patient in a grouped split.

Warnings are :class:`~covidscan.data.records.DataWarning` and are kept in ``SampleSet.issues``
for ``data info``, ``data audit``, ``train`` and ``evaluate`` to show.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from covidscan.config import ReadLimits
from covidscan.data.parallel import map_chunks, usable_cpus
from covidscan.data.readers import find_reader, get_reader
from covidscan.data.records import DataError, DataIssue, DataWarning, Sample
from covidscan.progress import progress as show_progress

# pandas' default missing-value strings (``read_csv(na_values=...)``), compared case-insensitively
NA_VALUES = frozenset({"", "nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none"})
_LISTED = 8  # rows named in one message
PARALLEL_MIN_FILES = (
    50_000  # a header check costs 0.1-0.3 ms, a spawned worker ~3 s of imports: below this, serial wins
)
_CHUNK = 500


def is_missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in NA_VALUES


@dataclass(frozen=True)
class Entry:
    """A sample and where it was declared (``metadata.csv line 7``, or its path for folders)."""

    sample: Sample
    where: str

    def relabelled(self, mapping: dict[str, str]) -> Entry:
        label = self.sample.label
        return replace(self, sample=replace(self.sample, label=mapping.get(label, label) if label else None))


def path_key(path: str | Path) -> str:
    """One spelling per file: absolute, normalised, symlinks resolved (never raises on loops)."""
    return os.path.normcase(os.path.realpath(path))


def _where(entries: Sequence[Entry]) -> tuple[str, ...]:
    return tuple(e.where for e in entries)


def _listed(where: Sequence[str]) -> str:
    shown = ", ".join(where[:_LISTED])
    return shown + (f" (+{len(where) - _LISTED} more)" if len(where) > _LISTED else "")


def check_entries(
    entries: list[Entry], *, skip_bad: bool, require_labels: bool
) -> tuple[list[Entry], list[tuple[str, str]], list[DataIssue]]:
    """Apply the row checks; return the kept entries, the skipped ``(path, reason)`` and the issues."""
    issues: list[DataIssue] = []
    skipped: list[tuple[str, str]] = []
    unlabeled = [e for e in entries if e.sample.label is None]
    if unlabeled and require_labels:
        where = _where(unlabeled)
        if not skip_bad:
            raise DataError(
                f"{unlabeled[0].sample.path}: no label ({len(unlabeled)} unlabeled rows, empty or NaN: "
                f"{_listed(where)}); training and evaluation need a label for every sample: fill them in "
                "or pass --skip-bad to skip those rows"
            )
        skipped += [(e.sample.path, "no label (empty or NaN)") for e in unlabeled]
        issues.append(
            DataIssue("missing_label", f"{len(unlabeled)} rows without a label skipped: {_listed(where)}", where)
        )
        entries = [e for e in entries if e.sample.label is not None]

    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        groups[path_key(entry.sample.path)].append(entry)
    conflicts = [g for g in groups.values() if len({e.sample.label for e in g}) > 1]
    if conflicts:
        issue = _conflict_issue(conflicts)
        if not skip_bad:
            raise DataError(f"{issue.message}; keep one label per file (or pass --skip-bad to drop those rows)")
        skipped += [(e.sample.path, f"conflicting labels: {' vs '.join(_labels(g))}") for g in conflicts for e in g]
        issues.append(issue)
    duplicates = [e for g in groups.values() if len(_labels(g)) == 1 for e in g[1:]]
    if duplicates:
        where = _where(duplicates)
        issues.append(
            DataIssue(
                "duplicate",
                f"{len(duplicates)} duplicate row(s) of files listed earlier dropped (first kept): {_listed(where)}",
                where,
            )
        )
    kept = [g[0] for g in groups.values() if len(_labels(g)) == 1]  # dicts keep first-seen order
    issues += _patient_issues(kept)
    for issue in issues:
        warnings.warn(issue.message, DataWarning, stacklevel=3)
    return kept, skipped, issues


def _labels(group: Sequence[Entry]) -> list[str]:
    return [str(label) for label in dict.fromkeys(e.sample.label for e in group)]


def _conflict_issue(conflicts: Sequence[Sequence[Entry]]) -> DataIssue:
    """``x.png is 'COVID' (meta.csv line 2) and 'normal' (meta.csv line 9)``, for the first few files."""
    described = [
        f"{group[0].sample.path} is "
        + " and ".join(
            f"{label!r} ({_listed(_where([e for e in group if str(e.sample.label) == label]))})"
            for label in _labels(group)
        )
        for group in conflicts
    ]
    more = f" (+{len(described) - 3} more)" if len(described) > 3 else ""
    return DataIssue(
        "conflicting_labels",
        f"{len(conflicts)} file(s) listed with different labels: {'; '.join(described[:3])}{more}",
        tuple(w for group in conflicts for w in _where(group)),
    )


def _patient_issues(entries: Sequence[Entry]) -> list[DataIssue]:
    """Rows without a patient id in a source whose other rows have one."""
    by_source: dict[str | None, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_source[entry.sample.source].append(entry)
    issues = []
    for source, group in by_source.items():
        without = [e for e in group if not e.sample.patient_id]
        if without and len(without) < len(group):
            where = _where(without)
            issues.append(
                DataIssue(
                    "missing_patient_id",
                    f"{source or 'data'}: {len(without)} of {len(group)} rows have no patient_id although the others "
                    f"do ({_listed(where)}); each becomes its own patient in a grouped split, so a patient's "
                    "slices may land in both train and test: fill in the ids",
                    where,
                )
            )
    return issues


def check_readable(path: str | Path, *, decode: bool, limits: ReadLimits | None = None) -> None:
    """Raise :class:`DataError` unless ``path`` reads within ``limits``: its header (``decode=False``)
    or all its pixels. A folder no scan reader takes is a folder of slice images (3D input)."""
    path = Path(path)
    if path.is_dir() and find_reader(path) is None:
        files = sorted(p for p in path.iterdir() if find_reader(p, volumetric=False) is not None)
        if not files:
            raise DataError(f"{path}: neither a DICOM series nor a folder of slice images")
        for file in files:
            check_readable(file, decode=decode, limits=limits)
        return
    reader = get_reader(path)
    if decode:
        reader.read(path, limits)
    else:
        reader.header(path, limits)


def _reasons_unreadable(paths: Sequence[str], decode: bool, limits: ReadLimits | None) -> list[str | None]:
    """Why each path cannot be read (``None``: readable). Module level, so spawned workers can run it."""
    reasons: list[str | None] = []
    for path in paths:
        try:
            check_readable(path, decode=decode, limits=limits)
        except DataError as exc:
            reasons.append(str(exc).removeprefix(f"{path}: "))
        else:
            reasons.append(None)
    return reasons


def verify_readable(
    samples: Sequence[Sample],
    *,
    decode: bool,
    limits: ReadLimits | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Split samples into readable ones and ``(path, reason)`` for the others.

    Opening every file's header is a per-file cost that dominated ``data info`` on large sets, so from
    :data:`PARALLEL_MIN_FILES` files on it runs in ``workers`` spawned processes (default: the CPUs
    this process may use)."""
    paths = [s.path for s in samples]
    workers = usable_cpus() if workers is None else workers
    if workers > 1 and len(paths) >= PARALLEL_MIN_FILES:
        parts = map_chunks(_reasons_unreadable, paths, _CHUNK, workers, decode, limits)
    else:
        parts = (_reasons_unreadable(paths[k : k + _CHUNK], decode, limits) for k in range(0, len(paths), _CHUNK))
    reasons: list[str | None] = []
    with show_progress(
        total=len(paths), desc="checking files", unit="file", disable=not progress or len(paths) < 200
    ) as bar:
        for part in parts:
            reasons.extend(part)
            bar.update(len(part))
    good = [sample for sample, reason in zip(samples, reasons) if reason is None]
    bad = [(sample.path, reason) for sample, reason in zip(samples, reasons) if reason is not None]
    return good, bad
