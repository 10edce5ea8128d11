"""DICOMweb against a real PACS: an Orthanc server started on loopback by the test itself.

Skipped when the Debian packages ``orthanc`` / ``orthanc-dicomweb`` are absent (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dicomweb_client")
pytest.importorskip("highdicom")
import pydicom
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from conftest import SHARED_DATASETS
from covidscan.data.synthetic import write_dicom_series
from covidscan.inference import ModelCard
from covidscan.serving import dicomweb
from covidscan.serving.dicom_results import EvidenceUnit, StudyFindings, build_result_objects, read_study_report
from helpers import make_checkpoint

PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",  # Debian's orthanc-dicomweb
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)


def dicomweb_plugin() -> str | None:
    found = [p for p in PLUGIN_CANDIDATES if Path(p).is_file()]
    found += sorted(str(p) for p in Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return found[0] if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_orthanc(folder: Path, timeout: float = 60.0) -> Iterator[str]:
    """Start Orthanc with its DICOMweb plugin; yields the DICOMweb root URL; stops it afterwards."""
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    if binary is None or plugin is None:
        raise RuntimeError("Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    port = free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True)
    config = {
        "Name": "covidscan-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [plugin],
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115  (closed after the server stops)
    process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/system", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc did not start: {(folder / 'orthanc.log').read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


pytestmark = pytest.mark.skipif(
    orthanc_binary() is None or dicomweb_plugin() is None,
    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)",
)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> str:
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        yield url


def synthetic_study(folder: Path, slices: int = 4) -> list[Path]:
    hu = np.random.default_rng(0).integers(-1000, 400, (slices, 20, 20)).astype(float)
    return write_dicom_series(folder, hu)


def store_files(client, files: list[Path]) -> str:
    datasets = [pydicom.dcmread(f) for f in files]
    client.store_instances(datasets)
    return str(datasets[0].StudyInstanceUID)


def test_fetch_picks_the_axial_ct_series_and_streams_it_to_disk(pacs, tmp_path):
    client = dicomweb.connect(pacs)
    axial = synthetic_study(tmp_path / "axial", slices=4)
    study = store_files(client, axial)
    coronal = [pydicom.dcmread(f) for f in synthetic_study(tmp_path / "coronal", slices=6)]
    for ds in coronal:  # a second, longer CT series in the same study, but coronal: must not be chosen
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = coronal[0].SeriesInstanceUID
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    client.store_instances(coronal)

    chosen = dicomweb.choose_series(client, study)
    assert chosen.series_instance_uid == pydicom.dcmread(axial[0]).SeriesInstanceUID
    assert chosen.instances == 4 and "among 2 image series" in chosen.reason and "coronal" in chosen.reason
    files = dicomweb.fetch_series(client, study, chosen.series_instance_uid, tmp_path / "fetched")
    fetched = sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    assert fetched == sorted(pydicom.dcmread(f).SOPInstanceUID for f in axial)


def test_results_stored_back_are_read_back_in_the_same_study(pacs, tmp_path):
    client = dicomweb.connect(pacs)
    files = synthetic_study(tmp_path / "series", slices=3)
    study = store_files(client, files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    card = ModelCard("run-x", "cnn1", ["COVID", "normal"], 32, 1, "none", "softmax", "ab" * 32, 1)
    units = [EvidenceUnit(f"slice {i}", [0.4, 0.6], [str(ds.SOPInstanceUID)]) for i, ds in enumerate(headers)]
    objects = build_result_objects(
        StudyFindings(["COVID", "normal"], [0.4, 0.6], "mean", units, card), headers, np.zeros((30, 30, 3), np.uint8)
    )
    stored = dicomweb.store_results(client, objects.datasets)
    assert sorted(stored) == sorted(str(ds.SOPInstanceUID) for ds in objects.datasets)

    modalities = {s["00080060"]["Value"][0] for s in client.search_for_series(study)}
    assert modalities == {"CT", "SR", "OT"}
    sr = client.retrieve_instance(
        study, objects.structured_report.SeriesInstanceUID, objects.structured_report.SOPInstanceUID
    )
    assert read_study_report(sr)["probabilities"] == pytest.approx({"COVID": 0.4, "normal": 0.6})
    assert dicomweb.choose_series(client, study).series_instance_uid == headers[0].SeriesInstanceUID


def test_unknown_study_and_unreachable_server_are_clear_errors(pacs, tmp_path):
    with pytest.raises(dicomweb.DicomWebError, match="not found"):
        dicomweb.choose_series(dicomweb.connect(pacs), "1.2.3.4.5")
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(dicomweb.DicomWebError, match="check that the server is running"):
        dicomweb.choose_series(dicomweb.connect(closed, timeout=5), "1.2.3")
    with pytest.raises(dicomweb.DicomWebError, match="not a DICOMweb URL"):
        dicomweb.connect("pacs.example:8042")


def source_series(tmp_path: Path) -> list[Path]:
    """covid-ct-md-sample's P001 (real JPEG-lossless CT) when ../shared/datasets is present, else synthetic."""
    real = SHARED_DATASETS / "covid-ct-md-sample" / "COVID-19" / "P001"
    return sorted(real.glob("*.dcm")) if real.is_dir() else synthetic_study(tmp_path / "synthetic", slices=5)


def test_predict_dicomweb_stores_results_only_when_asked(pacs, tmp_path, capsys):
    from covidscan.cli import main
    from covidscan.inference import load_predictor, predict_study

    client = dicomweb.connect(pacs)
    files = source_series(tmp_path)
    study = store_files(client, files)
    run = make_checkpoint(tmp_path, size=32)
    command = ["predict", "--checkpoint", str(run), "--dicomweb", pacs, "--study", study]

    assert main([*command, "--out", str(tmp_path / "dry")]) == 0
    assert {s["00080060"]["Value"][0] for s in client.search_for_series(study)} == {"CT"}  # nothing stored
    summary = json.loads((tmp_path / "dry" / study / "summary.json").read_text())
    assert summary["stored_in_pacs"] is False and (tmp_path / "dry" / study / "structured-report.dcm").is_file()
    assert "Research use only" in capsys.readouterr().out

    assert main([*command, "--out", str(tmp_path / "stored"), "--store-results"]) == 0
    summary = json.loads((tmp_path / "stored" / study / "summary.json").read_text())
    series = {s["00080060"]["Value"][0]: s["0020000E"]["Value"][0] for s in client.search_for_series(study)}
    assert set(series) == {"CT", "SR", "OT"}
    sr = client.retrieve_series(study, series["SR"])[0]
    overlay = client.retrieve_series(study, series["OT"])[0]
    assert sr.SOPClassUID == ComprehensiveSRStorage and overlay.SOPClassUID == SecondaryCaptureImageStorage
    assert sr.StudyInstanceUID == overlay.StudyInstanceUID == study
    report = read_study_report(sr)
    assert report["probabilities"] == pytest.approx(summary["probabilities"], abs=1e-6)
    assert report["algorithm"]["version"] == summary["model"]["model_version"]
    assert report["algorithm"]["parameters"]["checkpoint_sha256"] == summary["model"]["checkpoint_sha256"]
    assert report["algorithm"]["parameters"]["aggregation"].startswith(f"{summary['aggregation']} of ")
    assert len(report["units"]) == len(summary["items"]) == summary["series"]["slices"] == len(files)
    local = predict_study(load_predictor(run), files[0].parent)
    assert summary["probabilities"] == pytest.approx(local.probabilities, abs=1e-6)  # the same study path
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID in {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
    }
    assert sorted(summary["stored_sop_instance_uids"]) == sorted([sr.SOPInstanceUID, overlay.SOPInstanceUID])
    # a second run fetches the CT series only, not the results stored by the first
    assert main([*command, "--out", str(tmp_path / "again")]) == 0
