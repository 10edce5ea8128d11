"""``POST /v1/studies`` and the kept-study routes, through the real study prediction
(``covidscan.inference.predict_study``) of a tiny random 2D model on synthetic DICOM series / NIfTI."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from covidscan.data import LUNG_WINDOW, apply_window
from covidscan.data.synthetic import write_dicom_series
from covidscan.inference import load_predictor, predict_study
from helpers import CLASSES, make_checkpoint

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from covidscan.serving import create_app
from covidscan.serving.study_upload import StudyLimits

SLICES = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("study-api"))


@pytest.fixture(scope="module")
def client(run):
    app = create_app(run, study_limits=StudyLimits(max_upload_bytes=2_000_000, max_decompressed_bytes=3_000_000))
    with TestClient(app) as test_client:
        yield test_client


def series_files(folder: Path, slices: int = SLICES, **options) -> list[Path]:
    hu = np.random.default_rng(0).integers(-1000, 400, (slices, 24, 24)).astype(float)
    return write_dicom_series(folder, hu, file_order=list(reversed(range(slices))), **options)


def zipped(files: list[Path], extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in files:
            archive.write(f, f"{f.parent.name}/{f.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def dicomdir_bytes() -> bytes:
    """A minimal DICOMDIR (a media index: DICOM without an image or a study)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset("DICOMDIR", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "EXPORT"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def post_study(client, data: bytes, query: str = "", name: str = "study.zip"):
    return client.post(f"/v1/studies{query}", files={"file": (name, data, "application/octet-stream")})


def test_answer_is_the_study_prediction_without_identifiers_or_server_paths(client, run, tmp_path):
    files = series_files(tmp_path / "SERIES")
    junk = {  # what exports and macOS zips carry beside the images
        "SERIES/README.txt": b"exported by the PACS",
        "__MACOSX/SERIES/._slice_0000.dcm": b"\0" * 10,
        "SERIES/.DS_Store": b"\0" * 10,
        "DICOMDIR": dicomdir_bytes(),
    }
    response = post_study(client, zipped(files, junk))
    assert response.status_code == 200, response.text
    body = response.json()
    expected = predict_study(load_predictor(run), tmp_path / "SERIES").to_dict()
    assert body["probabilities"] == pytest.approx(expected["probabilities"])
    assert [item["index"] for item in body["items"]] == list(range(SLICES))
    for got, want in zip(body["items"], expected["items"]):
        assert got["probabilities"] == pytest.approx(want["probabilities"])
    assert (body["aggregation"], body["unit"], body["series"]["slices"]) == ("mean", "slice", SLICES)
    assert body["model"]["model_version"] and len(body["model"]["checkpoint_sha256"]) == 64
    assert any("Research use only" in w for w in body["warnings"])
    assert body["study"] == "study.zip" and "study_id" not in body
    assert {f["name"] for f in body["skipped_files"]} == {
        "__MACOSX/SERIES/._slice_0000.dcm",
        "SERIES/.DS_Store",
        "DICOMDIR",
    }
    text = json.dumps(body)
    assert "SYNTHETIC-001" not in text and "Synthetic^Patient" not in text and "covidscan-studies" not in text

    with_ids = post_study(client, zipped(files), "?include_identifiers=true&aggregation=max").json()
    assert with_ids["series"]["patient_id"] == "SYNTHETIC-001" and with_ids["aggregation"] == "max"


def test_several_series_the_axial_ct_one_is_chosen_and_named(client, tmp_path):
    axial = series_files(tmp_path / "axial")
    coronal = series_files(tmp_path / "coronal", slices=6, study_uid=str(pydicom.dcmread(axial[0]).StudyInstanceUID))
    for path in coronal:  # a longer CT series of the same study, but coronal: must not be chosen
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        ds.save_as(path)
    body = post_study(client, zipped(axial + coronal)).json()
    assert body["series"]["slices"] == SLICES and "coronal" in body["series"]["selection"]


def test_nifti_upload_gzipped(client, tmp_path):
    volume = np.random.default_rng(1).integers(-1000, 400, (24, 24, 3)).astype(np.int16)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 5.0, 1.0])), path)
    body = post_study(client, path.read_bytes(), "?keep=true", name="scan.nii.gz").json()
    assert body["series"]["slices"] == 3 and len(body["items"]) == 3 and body["name"] == "scan"
    png = client.get(f"/v1/studies/{body['study_id']}/slices/1")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (24, 24)


def test_kept_study_serves_slices_in_both_windows_and_cams(client, tmp_path):
    files = series_files(tmp_path / "SERIES")
    body = post_study(client, zipped(files), "?keep=true").json()
    study = body["study_id"]
    assert client.get(f"/v1/studies/{study}").json()["probabilities"] == body["probabilities"]
    lung = client.get(f"/v1/studies/{study}/slices/2?window=lung")
    mediastinal = client.get(f"/v1/studies/{study}/slices/2?window=mediastinal")
    assert lung.status_code == mediastinal.status_code == 200
    assert Image.open(io.BytesIO(lung.content)).size == (24, 24) and lung.content != mediastinal.content
    hu = np.random.default_rng(0).integers(-1000, 400, (SLICES, 24, 24)).astype(float)  # as series_files wrote
    for k in (0, SLICES - 1):  # viewer slice k = item k = the k-th slice position, whatever the file names
        shown = np.asarray(Image.open(io.BytesIO(client.get(f"/v1/studies/{study}/slices/{k}").content)))
        assert np.abs(shown.astype(int) - np.round(apply_window(hu[k], LUNG_WINDOW) * 255).astype(int)).max() <= 1
    cam = client.get(f"/v1/studies/{study}/slices/2/cam")
    assert cam.status_code == 200 and Image.open(io.BytesIO(cam.content)).mode == "RGBA"
    assert cam.headers["X-Predicted-Label"] in body["class_names"]
    assert client.get(f"/v1/studies/{study}/slices/2/cam?target=CAP").json()["error"] == "invalid_argument"
    assert client.get(f"/v1/studies/{study}/slices/{SLICES}").json()["error"] == "invalid_argument"
    assert client.get(f"/v1/studies/{study}/slices/0?window=bone").json()["error"] == "invalid_argument"
    assert client.delete(f"/v1/studies/{study}").json() == {"deleted": True}
    assert client.get(f"/v1/studies/{study}").json()["error"] == "study_not_found"


@pytest.mark.parametrize(
    "make, status, error",
    [
        (lambda tmp: zipped(series_files(tmp / "S", slices=3), {"../../evil.dcm": b"x"}), 422, "unreadable_study"),
        (lambda tmp: zipped([], {f"{i}.dcm": b"\0" * 1_000_000 for i in range(4)}), 413, "study_too_large"),
        (lambda tmp: zipped([], {"notes.txt": b"hello"}), 422, "unreadable_study"),
        (lambda tmp: b"PK\x03\x04" + b"\0" * 100, 422, "unreadable_study"),
        (lambda tmp: b"%PDF-1.7 not a study" * 20, 415, "unsupported_study"),
        (lambda tmp: b"PK\x03\x04" + b"\0" * 2_100_000, 413, "upload_too_large"),
    ],
    ids=["traversal", "zip-bomb", "no-dicom", "truncated-zip", "not-a-study", "oversize"],
)
def test_bad_studies_are_clear_4xx(client, tmp_path, make, status, error):
    response = post_study(client, make(tmp_path))
    body = response.json()
    assert (response.status_code, body["error"]) == (status, error), body
    assert str(tmp_path) not in body["detail"] and "covidscan-studies" not in body["detail"]
    assert client.get("/healthz").status_code == 200


def test_too_many_slices_and_bad_arguments(run, tmp_path):
    files = series_files(tmp_path / "SERIES", slices=5)
    with TestClient(create_app(run, study_limits=StudyLimits(max_slices=4))) as small:
        body = post_study(small, zipped(files)).json()
        assert body["error"] == "study_too_large" and "4" in body["detail"]
        assert post_study(small, zipped(files[:3]), "?aggregation=median").json()["error"] == "invalid_argument"
        assert small.get("/v1/model").json()["limits"]["max_study_slices"] == 4


def test_missing_file_on_studies_says_how_to_send_a_zip(client):
    body = client.post("/v1/studies", data={"x": "y"}).json()
    assert body["error"] == "missing_file" and "curl -F file=@study.zip" in body["detail"]


def test_a_3d_model_answers_stacks_and_the_viewer_still_shows_every_slice(tmp_path):
    from helpers import registered_model, tiny3d

    data = {"spatial_dims": 3, "depth": 4, "normalize": "sample", "volume": {"stride": 3}}
    with registered_model("tiny3d_study_api", tiny3d, spatial_dims=3):
        run = make_checkpoint(tmp_path, model="tiny3d_study_api", size=16, data=data)
        with TestClient(create_app(run)) as client3d:
            body = post_study(client3d, zipped(series_files(tmp_path / "SERIES", slices=7)), "?keep=true").json()
            assert body["unit"] == "stack" and body["series"]["slices"] == 7
            assert [(item["index"], item["last_index"]) for item in body["items"]] == [(0, 3), (3, 6)]
            assert client3d.get(f"/v1/studies/{body['study_id']}/slices/6").status_code == 200
            cam = client3d.get(f"/v1/studies/{body['study_id']}/slices/6/cam")
            assert cam.status_code == 200 and cam.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(cam.content)).size == (24, 24)  # the slice's own size, not the model's
            assert cam.headers["X-Predicted-Label"] in CLASSES
            first = client3d.get(f"/v1/studies/{body['study_id']}/slices/0/cam").content
            assert first != cam.content  # each slice gets its own plane of the whole-scan map
            assert client3d.get(f"/v1/studies/{body['study_id']}/slices/7/cam").status_code == 400
