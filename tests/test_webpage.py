"""The web page in a real headless Chromium: a CT slice (bars, heatmap) and a whole CT study (viewer).

Needs the Debian ``chromium`` package (``/usr/bin/chromium``) and the ``playwright`` Python
package; never runs ``playwright install``. Set ``COVIDSCAN_DOCS_SCREENSHOT=docs/img/serving-page.png``
to also write the screenshot used in docs/serving.md.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATASETS
from covidscan.data.synthetic import write_dicom_series
from covidscan.serving import create_app
from helpers import make_checkpoint, png_bytes

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium absent (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright Python package not installed")
uvicorn = pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server_url(tmp_path):
    """A real uvicorn server on a free loopback port, in a thread, stopped after the test."""
    app = create_app(make_checkpoint(tmp_path, size=64))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


def ct_slice(tmp_path: Path) -> Path:
    """A real SARS-CoV-2 CT slice when ../shared/datasets is present, a synthetic PNG otherwise."""
    real = SHARED_DATASETS / "sarscov2-ct" / "COVID" / "Covid (1).jpg"
    if real.is_file():
        return real
    path = tmp_path / "synthetic.png"
    path.write_bytes(png_bytes((96, 80)))
    return path


def test_upload_shows_probability_bars_and_heatmap(server_url, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(server_url)
            assert "Research use only" in page.locator(".notice").inner_text()
            page.wait_for_function("document.getElementById('model-line').textContent.includes('classes')")
            page.set_input_files("#file", str(ct_slice(tmp_path)))
            page.wait_for_selector("#bars .bar", timeout=30_000)
            assert sorted(page.locator("#bars .bar").evaluate_all("rows => rows.map(r => r.dataset.class)")) == [
                "COVID",
                "normal",
            ]
            assert page.locator("#label").inner_text() in ("COVID", "normal")
            page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0", timeout=60_000)
            page.wait_for_function("document.getElementById('image').naturalWidth > 0")
            screenshot = tmp_path / "page.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0
    if target := os.environ.get("COVIDSCAN_DOCS_SCREENSHOT"):  # a small palette PNG for the docs
        Image.open(screenshot).convert("RGB").quantize(colors=64).save(target, optimize=True)


def ct_series_files(tmp_path: Path) -> list[Path]:
    """The covid-ct-md-sample P001 series (37 JPEG-lossless slices) when present, a synthetic one otherwise."""
    real = SHARED_DATASETS / "covid-ct-md-sample" / "COVID-19" / "P001"
    if real.is_dir():
        return sorted(real.glob("*.dcm"))
    hu = np.random.default_rng(0).integers(-1000, 400, (6, 48, 48)).astype(float)
    return write_dicom_series(tmp_path / "series", hu, file_order=[3, 0, 5, 1, 4, 2])


def test_study_upload_viewer_scroll_strip_and_overlay(server_url, tmp_path):
    """A folder of DICOM files (packed into a zip by the page), then the verdict, wheel scrolling,
    a click on the probability strip, the window presets and the CAM overlay."""
    files = ct_series_files(tmp_path)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server_url)
            readme = tmp_path / "README.txt"  # exports carry such files: the page must not turn them into slices
            readme.write_text("exported by the PACS")
            page.set_input_files("#file", [str(f) for f in files] + [str(readme)])
            page.wait_for_selector("#study:not([hidden])", timeout=120_000)
            assert page.locator("#study-label").inner_text().split(" ")[0] in ("COVID", "normal")
            assert "Rule:" in page.locator("#study-rule").inner_text()
            assert "Research use only" in page.locator("#study-notice").inner_text()
            assert page.locator("#strip .cell").count() == len(files)
            page.wait_for_function("document.getElementById('slice').naturalWidth > 0")

            def current() -> int:
                return int(page.locator("#slice-label").inner_text().split()[1])

            page.locator("#strip .cell").nth(0).click()
            assert current() == 1
            page.locator("#stage").hover()
            page.mouse.wheel(0, 120)
            page.wait_for_function("document.getElementById('slice-label').textContent.startsWith('slice 2 ')")
            page.locator("button[data-window=mediastinal]").click()
            page.wait_for_function("document.getElementById('slice').src.includes('window=mediastinal')")
            page.locator("#cam-toggle").check()
            page.wait_for_function(
                "!document.getElementById('cam').hidden && document.getElementById('cam').naturalWidth > 0",
                timeout=60_000,
            )
            screenshot = tmp_path / "study.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    if target := os.environ.get("COVIDSCAN_DOCS_STUDY_SCREENSHOT"):
        Image.open(screenshot).convert("RGB").quantize(colors=64).save(target, optimize=True)
