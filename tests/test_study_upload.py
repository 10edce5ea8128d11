"""Study uploads reach the disk within the server's limits (zips themselves: ``inference.extract_zip``)."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from covidscan.serving.study_upload import StudyLimits, store_study
from covidscan.serving.upload import UploadError


def nifti_bytes(tmp_path: Path, shape=(8, 8, 3), compressed: bool = True) -> bytes:
    path = tmp_path / ("v.nii.gz" if compressed else "v.nii")
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), path)
    return path.read_bytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_nifti_is_stored_uncompressed_for_slice_reads(tmp_path, compressed):
    stored = store_study(io.BytesIO(nifti_bytes(tmp_path, compressed=compressed)), "scan", tmp_path / "out")
    assert stored.path == tmp_path / "out" / "volume.nii" and nib.load(stored.path).shape == (8, 8, 3)


def refused(data: bytes, tmp_path: Path, limits: StudyLimits = StudyLimits()) -> UploadError:
    with pytest.raises(UploadError) as info:
        store_study(io.BytesIO(data), "scan.nii.gz", tmp_path / "out", limits)
    return info.value


def test_gzip_bomb_and_slice_limit_are_413(tmp_path):
    bomb = gzip.compress(nifti_bytes(tmp_path, compressed=False) + b"\0" * 3_000_000)
    error = refused(bomb, tmp_path, StudyLimits(max_decompressed_bytes=1_000_000))
    assert (error.status, error.code) == (413, "study_too_large")
    many = refused(nifti_bytes(tmp_path, shape=(8, 8, 6)), tmp_path, StudyLimits(max_slices=5))
    assert (many.status, many.code) == (413, "study_too_large") and "scan.nii.gz" in many.detail
    assert str(tmp_path / "out") not in many.detail


@pytest.mark.parametrize(
    "data, status, code",
    [
        (b"", 400, "empty_upload"),
        (b"%PDF-1.7 not a study" * 20, 415, "unsupported_study"),
        (gzip.compress(b"plain text, not NIfTI" * 40), 415, "unsupported_study"),
        (gzip.compress(b"x" * 1000)[:-20], 422, "corrupt_study"),
    ],
    ids=["empty", "pdf", "gzip-not-nifti", "truncated-gzip"],
)
def test_unusable_uploads(tmp_path, data, status, code):
    error = refused(data, tmp_path)
    assert (error.status, error.code) == (status, code)
