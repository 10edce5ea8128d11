"""HTTP API: predictions match the Python API, and every kind of bad upload gets a JSON 4xx."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import covidscan
from helpers import CLASSES, dicom_bytes, make_checkpoint, png_bytes

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from covidscan.data import read_image  # noqa: E402
from covidscan.serving import UploadLimits, create_app, load_predictor  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def client(run_dir):
    with TestClient(create_app(run_dir, limits=UploadLimits(max_bytes=300_000, max_pixels=1024))) as test_client:
        yield test_client


def upload(client, data: bytes, name: str = "slice.png", content_type: str = "image/png", path: str = "/v1/predict"):
    return client.post(path, files={"file": (name, data, content_type)})


def test_health_and_model_card(client, run_dir):
    assert client.get("/healthz").json() == {"status": "ok", "model_id": run_dir.name}
    card = client.get("/v1/model").json()
    assert card["class_names"] == CLASSES and card["input_size"] == 32 and card["epoch"] == 2
    assert card["version"].startswith(f"{covidscan.__version__}+{card['checkpoint_sha256'][:12]}")
    assert card["metrics"] == {"val_accuracy": 0.5}
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_png_matches_python_api(client, run_dir, tmp_path):
    data = png_bytes()
    response = upload(client, data)
    assert response.status_code == 200, response.text
    body = response.json()
    (tmp_path / "slice.png").write_bytes(data)
    predictor = load_predictor(run_dir)
    expected = predictor.predict_batch(predictor.transform(read_image(tmp_path / "slice.png"))[None])[0]
    assert list(body["probabilities"]) == CLASSES
    np.testing.assert_allclose(list(body["probabilities"].values()), expected, atol=1e-6)
    assert body["predicted_label"] == CLASSES[int(np.argmax(expected))]
    assert body["model_id"] == run_dir.name and body["model_version"] == predictor.card.version
    assert body["image"] == {"format": "png", "height": 48, "width": 40}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] >= 0


@pytest.mark.parametrize(
    "name, data, content_type, fmt",
    [
        ("slice.jpg", png_bytes(fmt="JPEG"), "image/jpeg", "jpeg"),
        ("slice.dcm", dicom_bytes(), "application/dicom", "dicom"),
        ("slice.dcm", dicom_bytes(), "application/octet-stream", "dicom"),  # what browsers send for .dcm
    ],
)
def test_predict_other_formats(client, name, data, content_type, fmt):
    body = upload(client, data, name, content_type).json()
    assert body["image"]["format"] == fmt
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "data, content_type, status, error",
    [
        (b"", "image/png", 400, "empty_upload"),
        (b"%PDF-1.4 definitely not an image" * 10, "application/octet-stream", 415, "not_an_image"),
        (png_bytes(), "text/plain", 415, "unsupported_media_type"),
        (png_bytes((64, 64))[:200], "image/png", 422, "corrupt_image"),  # truncated mid-stream
        (png_bytes((64, 64), fmt="JPEG")[:30], "image/jpeg", 422, "corrupt_image"),  # truncated header
        (png_bytes((2000, 8)), "image/png", 413, "image_too_large"),  # declared side > max_pixels (1024)
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 400_000, "image/png", 413, "upload_too_large"),  # > max_bytes
        (dicom_bytes(with_pixels=False), "application/dicom", 422, "dicom_without_pixels"),
    ],
)
def test_bad_uploads_get_json_4xx_and_server_keeps_serving(client, data, content_type, status, error):
    for path in ("/v1/predict", "/v1/preview"):
        response = upload(client, data, content_type=content_type, path=path)
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error"] == error and body["detail"]
    assert upload(client, png_bytes()).status_code == 200


def test_missing_file_field_and_unknown_route_are_json_errors(client):
    response = client.post("/v1/predict", data={"other": "x"})
    assert response.status_code == 422 and response.json()["error"] == "missing_file"
    assert "curl -F file=@slice.png" in response.json()["detail"]
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_preview_renders_dicom_as_png(client):
    response = upload(client, dicom_bytes(), "slice.dcm", "application/dicom", path="/v1/preview")
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (36, 36)


def test_index_page_has_research_notice(client):
    page = client.get("/")
    assert page.status_code == 200 and "Research use only" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_explain_returns_overlay_png(client):
    response = upload(client, dicom_bytes(), "slice.dcm", "application/dicom", path="/v1/explain")
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).format == "PNG"
    assert response.headers["x-predicted-label"] in CLASSES


@pytest.mark.parametrize("query", ["method=nonsense", "target=influenza"])
def test_explain_rejects_unknown_method_or_class(client, query):
    response = client.post(f"/v1/explain?{query}", files={"file": ("a.png", png_bytes(), "image/png")})
    assert response.status_code == 400 and response.json()["error"] == "invalid_argument"


def test_serve_with_a_bad_checkpoint_prints_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import uvicorn

    from covidscan.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    truncated = make_checkpoint(tmp_path / "truncated") / "checkpoints" / "best.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a checkpoint at all")
    for path in (truncated, foreign, tmp_path / "missing-run"):
        assert main(["serve", "--checkpoint", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err


def test_create_app_needs_a_model():
    with pytest.raises(ValueError, match="checkpoint"):
        create_app()


@pytest.mark.integration
def test_real_jpeg_lossless_dicom_slice(client, shared_datasets):
    dicom = next(iter(sorted((shared_datasets / "covid-ct-md-sample" / "COVID-19").rglob("*.dcm"))))
    body = upload(client, dicom.read_bytes(), dicom.name, "application/dicom").json()
    assert body["image"] == {"format": "dicom", "height": 512, "width": 512}
    preview = upload(client, dicom.read_bytes(), dicom.name, "application/octet-stream", path="/v1/preview")
    assert Image.open(io.BytesIO(preview.content)).size == (512, 512)


def test_upload_limits_are_checked_without_the_middleware():
    from covidscan.serving import UploadError, decode_upload

    with pytest.raises(UploadError) as refused:
        decode_upload(png_bytes(), limits=UploadLimits(max_bytes=100))
    assert (refused.value.status, refused.value.code) == (413, "upload_too_large")
    with pytest.raises(ValueError, match="max image side"):
        UploadLimits(max_pixels=0)
