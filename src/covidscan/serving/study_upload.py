"""Put an uploaded study (a zip of a DICOM series, or a NIfTI volume) on disk, within the server's limits.

Zips are extracted by :func:`covidscan.data.extract_zip`, the one study-zip extractor (it refuses
traversal names and links, leaves out system files such as ``__MACOSX/`` and ``DICOMDIR``, and checks
the member count and the declared and written bytes, so a zip bomb stops at the limit). This module
adds only what an upload needs on top: the upload size, the format recognised from the first bytes
(the file name is the client's choice), and a ``.nii.gz`` decompressed — bounded — to a plain
``.nii``, so the viewer reads one slice by memory-mapping instead of decompressing the volume again
for every slice it shows. Every refusal is an :class:`UploadError` (a 4xx with a JSON body).
"""

from __future__ import annotations

import gzip
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from covidscan.config import ReadLimits
from covidscan.data import DataError, ExtractedZip, ZipLimits, extract_zip
from covidscan.data.readers import LimitError, get_reader
from covidscan.errors import UsageError
from covidscan.serving.upload import UploadError

CHUNK = 1 << 20


@dataclass(frozen=True)
class StudyLimits:
    """Bounds on one study upload (``covidscan serve --max-study-mb / --max-slices``)."""

    max_upload_bytes: int = 1024 * 2**20
    max_decompressed_bytes: int = 2048 * 2**20  # a zip's members in all, or a .nii.gz's volume
    max_slices: int = 2000  # files in a zip, slices of a NIfTI volume

    def __post_init__(self) -> None:
        if min(self.max_upload_bytes, self.max_decompressed_bytes, self.max_slices) < 1:
            raise UsageError(f"study limits must be positive, got {self}")

    def zip_limits(self) -> ZipLimits:
        return ZipLimits(max_members=self.max_slices, max_bytes=self.max_decompressed_bytes)

    def read_limits(self) -> ReadLimits:
        defaults = ReadLimits()
        return ReadLimits(
            max_slices=min(self.max_slices, defaults.max_slices),
            max_decoded_bytes=min(4 * self.max_decompressed_bytes, defaults.max_decoded_bytes),  # float32 of int16
        )


def sniff_study(head: bytes) -> str | None:
    """``zip``, ``gzip`` (a .nii.gz), ``nifti`` (NIfTI-1/2 header) or None, from the first bytes."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if _is_nifti_header(head):
        return "nifti"
    return None


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return True
    return len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00")  # NIfTI-2 magic at offset 4


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


@dataclass(frozen=True)
class StoredStudy:
    path: Path  # what to predict: the zip's folder, or ``volume.nii``
    skipped: list[dict[str, str]]  # zip members left out (system and index files), with the reason


def store_study(upload: BinaryIO, filename: str, dest: Path, limits: StudyLimits = StudyLimits()) -> StoredStudy:
    """Check and unpack ``upload`` (seekable) into ``dest``. Raises :class:`UploadError`; ``dest`` is
    left for the caller to remove."""
    upload.seek(0, 2)
    size = upload.tell()
    upload.seek(0)
    if size == 0:
        raise UploadError(400, "empty_upload", f"{filename}: the uploaded file is empty")
    if size > limits.max_upload_bytes:
        raise UploadError(
            413,
            "upload_too_large",
            f"{filename}: {size / 2**20:.1f} MB exceeds the {_mb(limits.max_upload_bytes)} limit",
        )
    kind = sniff_study(upload.read(540))
    upload.seek(0)
    if kind is None:
        raise UploadError(
            415,
            "unsupported_study",
            f"{filename}: not a zip of a DICOM series nor a NIfTI volume (.nii / .nii.gz); zip the series folder "
            "(e.g. `zip -r study.zip SERIES/`) and send it as the multipart field `file`",
        )
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "zip":
            archive = dest / "upload.zip"
            _copy(upload, archive, limits.max_upload_bytes, filename)
            extracted: ExtractedZip = extract_zip(archive, dest / "study", limits.zip_limits())
            archive.unlink()
            return StoredStudy(extracted.folder, extracted.skipped)
        volume = dest / "volume.nii"
        if kind == "gzip":
            with gzip.GzipFile(fileobj=upload, mode="rb") as stream:
                _copy(stream, volume, limits.max_decompressed_bytes, filename)
            if not _is_nifti_header(volume.open("rb").read(540)):
                raise UploadError(415, "unsupported_study", f"{filename}: a gzip file that is not a NIfTI volume")
        else:
            _copy(upload, volume, limits.max_upload_bytes, filename)
        get_reader(volume, volumetric=True).header(volume, limits.read_limits())  # slices and size before decoding
        return StoredStudy(volume, [])
    except (OSError, EOFError, zlib.error) as exc:
        raise UploadError(422, "corrupt_study", f"{filename}: cannot be decompressed ({exc})") from None
    except DataError as exc:
        raise study_refusal(exc, dest, filename) from None


def study_refusal(exc: DataError, folder: Path, filename: str) -> UploadError:
    """The 4xx for a study the data layer refused; the server's folder is replaced by the upload's name."""
    detail = str(exc)
    for path in (folder / "upload.zip", folder / "study", folder / "volume.nii", folder):
        detail = detail.replace(str(path), filename)
    if isinstance(exc, LimitError):
        return UploadError(413, "study_too_large", detail)
    return UploadError(422, "unreadable_study", detail)


def _copy(stream: BinaryIO | gzip.GzipFile, target: Path, budget: int, filename: str) -> None:
    """Copy ``stream`` to ``target`` in chunks, refusing as soon as more than ``budget`` bytes came out."""
    copied = 0
    with open(target, "wb") as out:
        while chunk := stream.read(CHUNK):
            copied += len(chunk)
            if copied > budget:
                raise UploadError(
                    413,
                    "study_too_large",
                    f"{filename}: decompresses to more than the {_mb(budget)} limit; send one series, uncompressed "
                    "size within the limit (covidscan serve --max-study-mb)",
                )
            out.write(chunk)


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
