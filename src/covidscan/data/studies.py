"""CT studies as inputs: find them, unpack a study zip safely, choose the axial CT series, open it.

A *study* is a DICOM study (the files sharing one StudyInstanceUID, from a folder or a ``.zip``), a
NIfTI volume, or a folder of slice images (PNG/JPEG, in natural name order). This is the one place
that turns such inputs into a scan path the readers take: ``covidscan predict``, the study API,
explain and DICOMweb pulls all go through :func:`open_study` (or :func:`extract_zip` and
:func:`choose_series` directly), so there is one zip extractor and one series rule.

**Which series.** A DICOM study often holds several series (thin and thick reconstructions, coronal
reformats, scouts, dose reports). The axial CT is chosen by its tags — Modality ``CT``, an axial
``ImageOrientationPatient``, ``ImageType`` ``ORIGINAL`` before ``DERIVED``, then the most slices —
and :func:`choose_series` says which series and why, naming the others.

**Zips.** Written here rather than with ``ZipFile.extractall`` / ``shutil.unpack_archive`` because
those neither bound the decompressed size nor refuse unsafe member names with an error the user can
act on: :func:`extract_zip` refuses absolute paths, ``..``, drive letters, NUL bytes, links and
encrypted members; checks the member count and declared size first, then counts the bytes *as
written*, so a zip bomb that lies about its sizes stops at the limit instead of filling the disk;
and skips the system files hospital exports and desktop zips carry (``__MACOSX/``, ``.DS_Store``,
``Thumbs.db``, the ``DICOMDIR`` index), listing what it skipped.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol, TypeVar

from covidscan.config import ReadLimits
from covidscan.data.readers import LimitError, SeriesInfo, group_dicom_series, is_dicom_file, is_nifti
from covidscan.data.records import DataError
from covidscan.data.volumes import slice_image_files
from covidscan.errors import UsageError

StudyKind = Literal["dicom", "nifti", "slices", "zip"]


# ---------------------------------------------------------------------------------------------- finding
@dataclass(frozen=True)
class StudySource:
    """Where one study's pixels are: found by :func:`find_studies`, or given as a path."""

    path: Path  # the folder holding the study, the NIfTI file, or the zip
    kind: StudyKind
    dicom_files: tuple[Path, ...] = ()  # every DICOM file of the study (all its series)
    study_uid: str | None = None
    error: str = ""  # why the study cannot be read (a folder whose DICOM headers are broken)

    @property
    def name(self) -> str:
        name = self.path.name
        for suffix in (".nii.gz", ".nii", ".zip"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name


def find_studies(inputs: Sequence[str | Path], limits: ReadLimits | None = None) -> list[StudySource]:
    """Every study under ``inputs`` (folders, zips, NIfTI files): DICOM files are grouped by
    StudyInstanceUID wherever they lie, NIfTI files and zips are one study each, and a folder that
    directly holds slice images (and no DICOM) is one study of slices."""
    studies: list[StudySource] = []
    dicom: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise DataError(f"{item}: input not found")
        if item.is_file():
            if item.suffix.lower() == ".zip":
                studies.append(StudySource(item, "zip"))
            elif is_nifti(item):
                studies.append(StudySource(item, "nifti"))
            elif is_dicom_file(item):
                dicom.append(item)
            else:
                raise DataError(
                    f"{item}: not a study (a DICOM series folder or .zip, a .nii/.nii.gz volume or a folder of "
                    "slice images); predict single images without --studies"
                )
            continue
        for folder in [item, *sorted(p for p in item.rglob("*") if p.is_dir())]:
            files = sorted(p for p in folder.iterdir() if p.is_file())
            folder_dicom = [p for p in files if is_dicom_file(p)]
            dicom.extend(folder_dicom)
            studies.extend(StudySource(p, "nifti") for p in files if is_nifti(p))
            studies.extend(StudySource(p, "zip") for p in files if p.suffix.lower() == ".zip")
            if not folder_dicom and slice_image_files(folder):  # 2D images a reader takes
                studies.append(StudySource(folder, "slices"))
    studies.extend(_dicom_studies(dicom, limits))
    if not studies:
        raise DataError(f"no studies (DICOM series, .zip, NIfTI or slice folders) among {[str(i) for i in inputs]}")
    return sorted(studies, key=lambda s: (str(s.path), s.study_uid or ""))


def _dicom_studies(files: list[Path], limits: ReadLimits | None) -> list[StudySource]:
    """DICOM files grouped by StudyInstanceUID (by folder when it is missing); each study is located
    at its files' common folder."""
    by_study: dict[tuple[str, str], list[Path]] = {}
    broken: list[StudySource] = []
    by_folder: dict[Path, list[Path]] = {}
    for file in sorted(set(files)):
        by_folder.setdefault(file.parent, []).append(file)
    for folder, folder_files in by_folder.items():
        try:  # folder by folder, so one broken file fails its own folder only
            series_list = group_dicom_series(folder_files, limits=limits)
        except DataError as exc:
            broken.append(StudySource(folder, "dicom", tuple(folder_files), None, str(exc)))
            continue
        for series in series_list:
            # files without a StudyInstanceUID (stripped by some anonymisers) are grouped by folder instead
            key = ("uid", series.study_uid) if series.study_uid else ("folder", str(folder))
            by_study.setdefault(key, []).extend([*series.files, *series.other_files])
    return broken + [
        StudySource(
            Path(os.path.commonpath([str(f.parent) for f in study_files])),
            "dicom",
            tuple(study_files),
            key[1] if key[0] == "uid" else None,
        )
        for key, study_files in by_study.items()
    ]


def resolve_study(path: str | Path, limits: ReadLimits | None = None) -> StudySource:
    """One study from a path given directly; a folder holding several studies is refused by name."""
    studies = find_studies([path], limits)
    if len(studies) != 1:
        listed = ", ".join(f"{s.path} ({s.study_uid or s.kind})" for s in studies[:5])
        raise DataError(f"{path}: holds {len(studies)} studies ({listed}); give one study at a time")
    return studies[0]


# ---------------------------------------------------------------------------------------------- zips
@dataclass(frozen=True)
class ZipLimits:
    """What a study zip may expand to; checked before and while extracting (the API's 413s)."""

    max_members: int = 5000  # files in the archive (system files excepted)
    max_bytes: int = 4 * 1024**3  # uncompressed bytes in all, declared and as written

    def __post_init__(self) -> None:
        if self.max_members < 1 or self.max_bytes < 1:
            raise UsageError(f"zip limits must be >= 1, got {self.max_members} members / {self.max_bytes} bytes")


@dataclass(frozen=True)
class ExtractedZip:
    folder: Path
    files: int  # members written
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{"name", "reason"}]: system files left out


_SYSTEM_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "dicomdir"})


def _unsafe(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if "\x00" in name:
        return "a NUL byte in the name"
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in posix.parts:
        return "a '..' component (it points outside the archive)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    if info.flag_bits & 0x1:
        return "encrypted; send an unencrypted zip"
    return None


def _is_system_file(name: str) -> bool:
    posix = PurePosixPath(name.replace("\\", "/").lower())
    return "__macosx" in posix.parts or posix.name in _SYSTEM_NAMES or posix.name.startswith("._")


def extract_zip(path: str | Path, dest: str | Path, limits: ZipLimits | None = None) -> ExtractedZip:
    """Extract a study zip into ``dest`` safely (module docstring): unsafe members are a
    :class:`DataError`, exceeded limits a :class:`LimitError`; nothing outside ``dest`` is written."""
    path, dest, limits = Path(path), Path(dest), limits or ZipLimits()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip file ({exc})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        for member in members:
            if reason := _unsafe(member):
                raise DataError(f"{path}: member {member.filename!r} is refused ({reason}); zip the series folder")
        skipped = [
            {"name": m.filename, "reason": "system or index file"} for m in members if _is_system_file(m.filename)
        ]
        members = [m for m in members if not _is_system_file(m.filename)]
        if len(members) > limits.max_members:
            raise LimitError(f"{path}: {len(members)} files exceed the {limits.max_members}-file limit of a study zip")
        declared = sum(m.file_size for m in members)
        if declared > limits.max_bytes:
            raise LimitError(
                f"{path}: members declare {declared / 2**20:.2f} MiB uncompressed, over the "
                f"{limits.max_bytes / 2**20:.2f} MiB limit of a study zip; send one series"
            )
        written = 0
        for member in members:
            target = dest / PurePosixPath(member.filename.replace("\\", "/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(member) as source, open(target, "wb") as sink:
                    while block := source.read(1 << 20):
                        written += len(block)
                        if written > limits.max_bytes:
                            raise LimitError(
                                f"{path}: expands to more than {limits.max_bytes / 2**20:.2f} MiB although it "
                                "declares less; refused as a zip bomb"
                            )
                        sink.write(block)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
                raise DataError(f"{path}: member {member.filename!r} is corrupt ({exc})") from None
    return ExtractedZip(dest, len(members), skipped)


# ---------------------------------------------------------------------------------------------- series
class SeriesTags(Protocol):
    """What the series rule reads: :class:`SeriesInfo` (files on disk) or a DICOMweb series' metadata."""

    @property
    def modality(self) -> str | None: ...
    @property
    def plane(self) -> str: ...
    @property
    def image_type(self) -> tuple[str, ...]: ...
    @property
    def description(self) -> str: ...
    @property
    def series_number(self) -> int | None: ...
    @property
    def num_slices(self) -> int: ...


S = TypeVar("S", bound=SeriesTags)


def choose_series(series: Sequence[S]) -> tuple[S, str]:
    """The axial CT series of a study and a sentence saying why (module docstring has the rule);
    works on files (:class:`SeriesInfo`) and on DICOMweb metadata alike, so both pick the same series."""
    images = [s for s in series if s.num_slices > 0]
    if not images:
        raise DataError("the study holds no DICOM image series (only reports or other objects)")
    ct = [s for s in images if s.modality == "CT"]
    if not ct:
        modalities = sorted({s.modality or "unknown" for s in images})
        raise DataError(f"the study holds no CT series (modalities {modalities}); covidscan models read chest CT")
    axial = [s for s in ct if s.plane == "axial"] or [s for s in ct if s.plane == "unknown"]
    if not axial:
        planes = sorted({s.plane for s in ct})
        raise DataError(f"the study's CT series are {planes}, none axial; export the axial series")
    original = [s for s in axial if "ORIGINAL" in s.image_type] or axial
    chosen = max(original, key=lambda s: (s.num_slices, -(s.series_number or 0)))
    if len(images) == 1:
        return chosen, "the study's only image series"
    criteria = ["Modality CT", f"orientation {chosen.plane}"]
    if "ORIGINAL" in chosen.image_type:
        criteria.append("ImageType ORIGINAL")
    if len(original) > 1:
        criteria.append(f"the most slices ({chosen.num_slices})")
    others = "; ".join(describe_series(s) for s in images if s is not chosen)
    return chosen, f"chosen for {', '.join(criteria)} among {len(images)} image series; not chosen: {others}"


def describe_series(series: SeriesTags) -> str:
    """One line naming a series by its tags (no patient identifiers)."""
    kind = "/".join(series.image_type[:2]) or "no ImageType"
    label = f"series {series.series_number}" if series.series_number is not None else "series"
    text = f"{label} {series.description!r}" if series.description else label
    return f"{text} ({series.modality or '?'}, {series.plane}, {kind}, {series.num_slices} slices)"


@contextmanager
def _series_folder(chosen: SeriesInfo, study: StudySource) -> Iterator[Path]:
    """A folder holding exactly the chosen series: its own folder when it has nothing else, else a
    temporary folder of hard links (copies across file systems) named in slice order."""
    folders = {f.parent for f in chosen.files}
    if len(folders) == 1:
        folder = next(iter(folders))
        chosen_files = set(chosen.files)
        if not any(f.parent == folder and f not in chosen_files for f in study.dicom_files):
            yield folder
            return
    with tempfile.TemporaryDirectory(prefix="covidscan-series-") as tmp:
        for index, file in enumerate(chosen.files):
            target = Path(tmp) / f"{index:05d}{file.suffix or '.dcm'}"
            try:
                os.link(file, target)
            except OSError:
                shutil.copyfile(file, target)
        yield Path(tmp)


# ---------------------------------------------------------------------------------------------- opening
@dataclass(frozen=True)
class OpenStudy:
    """A study made ready to read: one series as one scan path (see :func:`open_study`)."""

    given: Path  # what the caller named (folder, zip, NIfTI file)
    name: str
    kind: Literal["dicom", "nifti", "slices"]
    scan: Path  # a DICOM folder holding exactly the chosen series, a NIfTI file or a slice folder
    series: SeriesInfo | None  # the chosen DICOM series
    selection: str  # which series and why
    skipped: list[dict[str, str]] = field(default_factory=list)  # zip members left out
    extracted: bool = False  # a zip extracted to a temporary folder: ``scan`` is gone after the block


@contextmanager
def open_study(
    study: str | Path | StudySource, *, limits: ReadLimits | None = None, zip_limits: ZipLimits | None = None
) -> Iterator[OpenStudy]:
    """Extract a zip, choose the axial CT series of a DICOM study and give it a folder of its own, for
    as long as the ``with`` block lasts (temporary files are removed after it)."""
    given = study.path if isinstance(study, StudySource) else Path(study)
    with ExitStack() as stack:
        source = study if isinstance(study, StudySource) else resolve_study(given, limits)
        if source.error:
            raise DataError(source.error)
        name, skipped, extracted = source.name, [], source.kind == "zip"
        if extracted:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="covidscan-study-")))
            unpacked = extract_zip(source.path, tmp, zip_limits)
            skipped = unpacked.skipped
            try:
                source = resolve_study(unpacked.folder, limits)
            except DataError as exc:
                raise DataError(str(exc).replace(str(tmp), str(given))) from None
            if source.error:
                raise DataError(source.error.replace(str(tmp), str(given)))
        if source.kind == "dicom":
            try:
                chosen, reason = choose_series(group_dicom_series(source.dicom_files, limits=limits))
            except DataError as exc:
                raise DataError(f"{given}: {exc}".replace(str(source.path), str(given))) from None
            scan = stack.enter_context(_series_folder(chosen, source))
            yield OpenStudy(given, name, "dicom", scan, chosen, reason, skipped, extracted)
        elif source.kind == "nifti":
            yield OpenStudy(given, name, "nifti", source.path, None, "a NIfTI volume (one series)", skipped, extracted)
        elif source.kind == "slices":
            reason = "a folder of slice images (natural name order)"
            yield OpenStudy(given, name, "slices", source.path, None, reason, skipped, extracted)
        else:
            raise DataError(f"{given}: a zip inside a zip is not read; extract the outer one")
