"""Hostile and broken input against the HTTP API (issue #16), on a real uvicorn server.

The corpus is generated here. For every case: a documented 4xx with a JSON body ``{error, detail}``,
no NaN anywhere in the answer, and the server healthy afterwards — on the *same* keep-alive
connection, so a case that made the server drop the connection would fail the next request.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import select
import socket
import threading
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import dicom_bytes, make_checkpoint, png_bytes

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from covidscan.serving import UploadLimits, create_app  # noqa: E402
from covidscan.serving.study_upload import StudyLimits  # noqa: E402

MAX_BYTES = 200_000
STUDY_LIMITS = StudyLimits(max_upload_bytes=1_000_000, max_decompressed_bytes=4_000_000, max_slices=20)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(host, port) of a real uvicorn server with small upload limits, stopped after the module."""
    app = create_app(
        make_checkpoint(tmp_path_factory.mktemp("bad-input")),
        limits=UploadLimits(max_bytes=MAX_BYTES, max_pixels=1024),
        study_limits=STUDY_LIMITS,
    )

    def broken_endpoint():  # stands for a bug: an exception no handler expects
        raise RuntimeError("simulated bug")

    app.add_api_route("/test-only/bug", broken_endpoint, methods=["GET"])
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield "127.0.0.1", config.port
    server.should_exit = True
    thread.join(timeout=10)


def multipart(fields: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, (filename, data, content_type) in fields.items():
        body.write(f"--{boundary}\r\n".encode())
        body.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
        body.write(f"Content-Type: {content_type}\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def post(connection: http.client.HTTPConnection, path: str, fields) -> tuple[int, bytes]:
    body, content_type = multipart(fields)
    connection.request("POST", path, body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    return response.status, response.read()


# -- the corpus -------------------------------------------------------------------------------------


def bomb_png() -> bytes:
    """A PNG declaring 30000x30000 pixels in a few hundred bytes (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG")
    return buffer.getvalue()


def nan_tiff() -> bytes:
    buffer = io.BytesIO()
    pixels = np.full((32, 32), np.nan, np.float32)
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    return buffer.getvalue()


def dicom_with_rescale(slope: bytes) -> bytes:
    """A valid CT slice whose RescaleSlope (0028,1053) value bytes are replaced by ``slope`` (2 bytes)."""
    data = dicom_bytes()
    tag = data.find(b"\x28\x00\x53\x10DS")
    assert tag > 0 and len(slope) % 2 == 0
    length = int.from_bytes(data[tag + 6 : tag + 8], "little")
    return data[: tag + 6] + len(slope).to_bytes(2, "little") + slope + data[tag + 8 + length :]


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


IMAGE_CASES = {
    "bomb PNG": (bomb_png(), "image/png", 413, "image_too_large"),
    "truncated PNG": (png_bytes((64, 64))[:300], "image/png", 422, "corrupt_image"),
    "truncated JPEG": (png_bytes((64, 64), fmt="JPEG")[:200], "image/jpeg", 422, "corrupt_image"),
    # TIFF is not an accepted upload format; were it accepted, NaN pixels would be a corrupt image
    "NaN TIFF": (nan_tiff(), "image/tiff", (415, 422), None),
    "DICOM with non-numeric RescaleSlope": (dicom_with_rescale(b"ab"), "application/dicom", 422, "corrupt_image"),
    "DICOM with NaN RescaleSlope": (dicom_with_rescale(b"NaN "), "application/dicom", 422, "corrupt_image"),
    "DICOM without pixels": (dicom_bytes(with_pixels=False), "application/dicom", 422, "dicom_without_pixels"),
    "not an image": (b"MZ\x90\x00" + b"\0" * 500, "application/octet-stream", 415, "not_an_image"),
    "empty file": (b"", "image/png", 400, "empty_upload"),
    "oversize upload": (b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_BYTES + 100_000), "image/png", 413, "upload_too_large"),
}


def strict_json(body: bytes):
    """Parse JSON refusing the non-standard NaN / Infinity literals (what Python's json would emit for nan)."""

    def refuse(literal: str):
        raise AssertionError(f"non-finite number {literal} in {body[:300]!r}")

    return json.loads(body, parse_constant=refuse)


STUDY_CASES = {
    "zip bomb": (zip_bytes({f"{i}.dcm": b"\0" * 2_000_000 for i in range(3)}), 413, "study_too_large"),
    "zip with traversal names": (zip_bytes({"../../evil.dcm": dicom_bytes()}), 422, "unreadable_study"),
    "zip with too many files": (zip_bytes({f"{i}.dcm": dicom_bytes() for i in range(21)}), 413, "study_too_large"),
    "zip without DICOM": (zip_bytes({"notes.txt": b"hello"}), 422, "unreadable_study"),
    "truncated zip": (zip_bytes({"a.dcm": dicom_bytes()})[:150], 422, "unreadable_study"),
    "not a study": (png_bytes(), 415, "unsupported_study"),
    "oversize study": (b"PK\x03\x04" + b"\0" * 1_100_000, 413, "upload_too_large"),
}


def assert_clean_refusal(status: int, body: bytes, expected_status, expected_error) -> dict:
    expected = expected_status if isinstance(expected_status, tuple) else (expected_status,)
    assert status in expected, body[:300]
    payload = strict_json(body)
    assert set(payload) == {"error", "detail"} and payload["detail"]
    assert "Traceback" not in payload["detail"]
    if expected_error:
        assert payload["error"] == expected_error
    return payload


def assert_healthy(connection: http.client.HTTPConnection) -> None:
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    status, body = post(connection, "/v1/predict", {"file": ("ok.png", png_bytes(), "image/png")})
    assert status == 200, body[:300]
    probabilities = strict_json(body)["probabilities"]
    assert all(math.isfinite(p) for p in probabilities.values())


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
@pytest.mark.parametrize("path", ["/v1/predict", "/v1/explain", "/v1/preview"])
def test_bad_image_is_a_documented_4xx_and_the_connection_stays_usable(server, case, path):
    data, content_type, status, error = IMAGE_CASES[case]
    connection = http.client.HTTPConnection(*server, timeout=60)
    try:
        assert_healthy(connection)
        socket_before = connection.sock
        got, body = post(connection, path, {"file": (f"case{Path(content_type).suffix}", data, content_type)})
        assert_clean_refusal(got, body, status, error)
        assert_healthy(connection)
        assert connection.sock is socket_before  # the same keep-alive connection served every request
    finally:
        connection.close()


@pytest.mark.parametrize("case", sorted(STUDY_CASES))
def test_bad_study_is_a_documented_4xx_and_the_connection_stays_usable(server, case):
    data, status, error = STUDY_CASES[case]
    connection = http.client.HTTPConnection(*server, timeout=60)
    try:
        assert_healthy(connection)
        socket_before = connection.sock
        got, body = post(connection, "/v1/studies", {"file": ("study.zip", data, "application/zip")})
        assert_clean_refusal(got, body, status, error)
        assert_healthy(connection)
        assert connection.sock is socket_before
    finally:
        connection.close()


def test_missing_file_field_says_how_to_send_it(server):
    connection = http.client.HTTPConnection(*server, timeout=60)
    try:
        got, body = post(connection, "/v1/predict", {"image": ("slice.png", png_bytes(), "image/png")})
        payload = assert_clean_refusal(got, body, 422, "missing_file")
        assert "curl -F file=@slice.png" in payload["detail"] and "/v1/predict" in payload["detail"]
        assert_healthy(connection)
    finally:
        connection.close()


@pytest.mark.parametrize(
    "method, path, status, error", [("GET", "/v1/nothing", 404, "not_found"), ("GET", "/v1/predict", 405, None)]
)
def test_wrong_route_or_method_points_to_the_docs(server, method, path, status, error):
    connection = http.client.HTTPConnection(*server, timeout=60)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        payload = assert_clean_refusal(response.status, response.read(), status, error)
        assert "/docs" in payload["detail"]
    finally:
        connection.close()


def test_oversize_body_is_refused_from_content_length_before_it_is_read(server):
    """The 413 comes from the Content-Length header; the body is never sent."""
    connection = http.client.HTTPConnection(*server, timeout=60)
    try:
        connection.putrequest("POST", "/v1/predict")
        connection.putheader("Content-Type", "multipart/form-data; boundary=x")
        connection.putheader("Content-Length", str(50 * 2**20))
        connection.endheaders()
        response = connection.getresponse()
        assert_clean_refusal(response.status, response.read(), 413, "upload_too_large")
    finally:
        connection.close()
    assert_healthy(http.client.HTTPConnection(*server, timeout=60))


def test_an_unexpected_error_is_a_json_500_and_the_connection_survives(server):
    connection = http.client.HTTPConnection(*server, timeout=60)
    try:
        assert_healthy(connection)
        socket_before = connection.sock
        connection.request("GET", "/test-only/bug")
        response = connection.getresponse()
        payload = strict_json(response.read())
        assert response.status == 500 and payload["error"] == "internal_error"
        assert "simulated bug" not in payload["detail"]  # internals stay in the server log
        assert_healthy(connection)
        assert connection.sock is socket_before
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/studies"])
def test_chunked_oversize_body_is_refused_while_it_arrives(server, path):
    """No Content-Length to check up front: the server counts the body as it arrives and answers 413
    long before a 64 MB chunked upload has been sent (instead of spooling all of it first)."""
    total, chunk = 64 * 2**20, b"\0" * 65536
    with socket.create_connection(server, timeout=60) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n".encode()
        )
        sent, answered = 0, False
        preamble = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
        for data in (preamble, *(chunk for _ in range(total // len(chunk)))):
            try:
                sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            except OSError:  # the server answered and closed while we were still sending
                break
            sent += len(data)
            if select.select([sock], [], [], 0)[0]:
                answered = True
                break
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            if not part:
                break
            response += part
    assert answered or sent < total
    assert sent < 16 * 2**20, f"the server let {sent / 2**20:.0f} MB arrive before refusing"
    assert b" 413 " in response.split(b"\r\n", 1)[0] and b"upload_too_large" in response
    assert_healthy(http.client.HTTPConnection(*server, timeout=60))
