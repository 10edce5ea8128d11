"""The unit every loader produces: one labelled file (or series) with its patient, split and source."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from covidscan.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data. The message names the offending file and how to fix or skip it."""

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str) and args[0].startswith(_WORKER_PREFIX) and _WORKER_MARK in args[0]:
            self.worker_traceback = args[0]
            args = (_original_message(args[0]), *args[1:])
        super().__init__(*args)


# torch re-raises an exception from a DataLoader worker as ``type(exc)(text)``, the text being "Caught
# DataError in DataLoader worker process 0." plus the worker's whole traceback; the user gets the
# original one-line message back (the traceback stays in ``DataError.worker_traceback``).
_WORKER_PREFIX = "Caught "
_WORKER_MARK = "\nOriginal Traceback (most recent call last):\n"


def _original_message(text: str) -> str:
    """``pkg.module.LimitError: x.png: too large`` (the traceback's last line) -> ``x.png: too large``."""
    last = text.rstrip().rsplit("\n", 1)[-1]
    kind, sep, message = last.partition(": ")
    return message if sep and kind.rsplit(".", 1)[-1].endswith("Error") else text


class DataWarning(UserWarning):
    """Suspicious input data that is used anyway (duplicate manifest rows, missing patient ids)."""


@dataclass(frozen=True)
class Sample:
    path: str  # an image file, a DICOM file, a DICOM series folder or a NIfTI file
    label: str | None  # class name; None for unlabeled images (prediction only)
    patient_id: str | None = None
    split: str | None = None  # "train" / "val" / "test" once assigned
    source: str | None = None  # the dataset it came from (data.source's name), for per-source splits and metrics

    def with_split(self, split: str) -> Sample:
        return replace(self, split=split)


@dataclass(frozen=True)
class DataIssue:
    """A problem found in a dataset's description (a manifest, usually), with where it is."""

    kind: str  # duplicate | conflicting_labels | missing_label | missing_patient_id
    message: str  # one line: what, where (rows or files), and what was done about it
    where: tuple[str, ...] = ()  # e.g. "metadata.csv line 7", or file paths

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "message": self.message, "where": list(self.where)}


@dataclass
class SampleSet:
    """Samples plus the class order that maps labels to indices (the run's label map)."""

    samples: list[Sample]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) under --skip-bad
    issues: list[DataIssue] = field(default_factory=list)  # duplicates, missing patient ids... (warned)

    @property
    def label_map(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.class_names)}

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.samples)
        return {name: counts.get(name, 0) for name in self.class_names}

    def sources(self) -> list[str]:
        """Source names in first-seen order (samples without one are left out)."""
        return list(dict.fromkeys(s.source for s in self.samples if s.source))

    def source_class_counts(self) -> dict[str, dict[str, int]]:
        """``{source: {class: count}}`` for every source and class (zeros included)."""
        counts = Counter((s.source, s.label) for s in self.samples)
        return {src: {name: counts.get((src, name), 0) for name in self.class_names} for src in self.sources()}

    def has_patients(self) -> bool:
        return any(s.patient_id for s in self.samples)

    def subset(self, split: str) -> SampleSet:
        return SampleSet([s for s in self.samples if s.split == split], self.class_names)

    def labels(self) -> list[int]:
        """Class index of each sample; -1 for an unlabeled one (as datasets report it)."""
        mapping = self.label_map
        return [-1 if s.label is None else mapping[s.label] for s in self.samples]
