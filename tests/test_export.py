"""Export: ONNX / TorchScript give PyTorch's probabilities, and predict/serve run the ONNX file."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import SHARED_DATASETS, write_image_folder
from covidscan.cli import main
from covidscan.data import read_image
from covidscan.inference import metadata_path
from covidscan.serving import create_app, export_model, load_predictor, predict_files
from covidscan.serving.export import SUFFIXES
from helpers import CLASSES, make_checkpoint, png_bytes

pytest.importorskip("onnxruntime")


def check_images(count: int = 6) -> list[np.ndarray]:
    """Real CT slices from ../shared/datasets when present, synthetic images otherwise."""
    folder = SHARED_DATASETS / "sarscov2-ct" / "COVID"
    if folder.is_dir():
        return [read_image(p) for p in sorted(folder.glob("*.jpg"))[:count]]
    rng = np.random.default_rng(0)
    return [rng.random((50 + 7 * i, 60), dtype=np.float32) for i in range(count)]


def check_batch(predictor) -> torch.Tensor:
    transform = predictor.transform
    return torch.stack([transform(image) for image in check_images()])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = make_checkpoint(tmp_path_factory.mktemp("export"))
    return run, export_model(run, "onnx")


def test_onnx_matches_pytorch_with_dynamic_batch(exported):
    run, result = exported
    torch_model, onnx_model = load_predictor(run), load_predictor(onnx=result.path)
    batch = check_batch(torch_model)
    for size in (1, len(batch)):
        diff = np.abs(onnx_model.predict_batch(batch[:size]) - torch_model.predict_batch(batch[:size]))
        assert diff.shape == (size, len(CLASSES)) and diff.max() < 1e-4
    assert result.max_abs_diff < 1e-4


def test_metadata_lets_onnx_run_without_the_checkpoint(exported):
    run, result = exported
    metadata = json.loads(metadata_path(result.path).read_text())
    assert metadata["card"]["class_names"] == CLASSES and metadata["input"]["shape"] == ["batch", 1, 32, 32]
    assert metadata["config"]["data"]["normalize"] == "imagenet"
    onnx_model = load_predictor(onnx=result.path)
    assert onnx_model.card == load_predictor(run).card and onnx_model.engine == "onnxruntime"


def test_predict_with_onnx_matches_pytorch(exported, tmp_path):
    run, result = exported
    images = write_image_folder(tmp_path / "images", {"a": 3, "b": 3})
    rows = {}
    for name, predictor in {"torch": load_predictor(run), "onnx": load_predictor(onnx=result.path)}.items():
        with open(predict_files(predictor, [images], tmp_path / f"{name}.csv", progress=False).out) as handle:
            rows[name] = [[float(r[f"prob_{c}"]) for c in CLASSES] for r in csv.DictReader(handle)]
    np.testing.assert_allclose(rows["onnx"], rows["torch"], atol=1e-4)


def test_serve_onnx(exported):
    from fastapi.testclient import TestClient

    _run, result = exported
    with TestClient(create_app(onnx=result.path)) as client:
        assert client.get("/v1/model").json()["engine"] == "onnxruntime"
        files = {"file": ("a.png", png_bytes(), "image/png")}
        assert client.post("/v1/predict", files=files).json()["engine"] == "onnxruntime"
        explain = client.post("/v1/explain", files=files)
        assert explain.status_code == 409 and explain.json()["error"] == "explain_unavailable"


def test_torchscript_via_cli(exported, tmp_path, capsys):
    run, _ = exported
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max |p_export - p_pytorch|" in capsys.readouterr().out
    predictor = load_predictor(run)
    batch = check_batch(predictor)
    scripted = torch.jit.load(str(out))
    assert np.abs(scripted(batch).detach().numpy() - predictor.predict_batch(batch)).max() < 1e-4


def test_resnet18_onnx_matches_pytorch(tmp_path):
    run = make_checkpoint(tmp_path, model="resnet18", size=64, channels=3)
    result = export_model(run, "onnx", tmp_path / "resnet18.onnx")
    torch_model, onnx_model = load_predictor(run), load_predictor(onnx=result.path)
    batch = check_batch(torch_model)
    assert np.abs(onnx_model.predict_batch(batch) - torch_model.predict_batch(batch)).max() < 1e-4


def test_export_rejects_unknown_format(exported):
    with pytest.raises(ValueError, match="format"):
        export_model(exported[0], "tflite")


def stacks_3d(config, scan) -> torch.Tensor:
    from covidscan.data import Sample
    from covidscan.data.volumes import VolumeStackDataset

    dataset = VolumeStackDataset([Sample(str(scan), None)], [], config, train=False)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_3d_model_exports_and_matches_pytorch_on_its_stacks(tmp_path, fmt):
    """A 3D model's export takes (N, C, D, S, S) stacks; ONNX evaluates a scan and predicts a study like PyTorch."""
    from covidscan.data import Sample
    from covidscan.evaluation import predict
    from covidscan.inference import predict_study
    from helpers import registered_model, tiny3d, write_nifti

    data = {"spatial_dims": 3, "depth": 4, "normalize": "sample", "volume": {"stride": 2}}
    scan = write_nifti(tmp_path / "scan.nii.gz", slices=9)
    with registered_model("tiny3d_export", tiny3d, spatial_dims=3):
        run = make_checkpoint(tmp_path, model="tiny3d_export", size=16, data=data)
        torch_model = load_predictor(run)
        stacks = stacks_3d(torch_model.config.data, scan)
        result = export_model(run, fmt, tmp_path / f"model{SUFFIXES[fmt]}", check_batch=stacks)
        assert result.max_abs_diff < 1e-4
        metadata = json.loads(metadata_path(result.path).read_text())
        assert metadata["input"]["shape"] == ["batch", 1, 4, 16, 16] and metadata["card"]["spatial_dims"] == 3
        if fmt == "onnx":
            onnx_model = load_predictor(onnx=result.path)
            np.testing.assert_allclose(onnx_model.predict_batch(stacks), torch_model.predict_batch(stacks), atol=1e-4)
            scans = [Sample(str(scan), "COVID")]
            from_onnx, from_torch = predict(onnx_model, scans), predict(torch_model, scans)
            np.testing.assert_allclose(from_onnx.proba, from_torch.proba, atol=1e-4)
            assert from_onnx.paths == from_torch.paths and len(from_onnx.paths) == 4  # stacks at 0, 2, 4 and 5
            study_onnx, study_torch = predict_study(onnx_model, scan), predict_study(torch_model, scan)
            assert study_onnx.probabilities == pytest.approx(study_torch.probabilities, abs=1e-4)


@pytest.mark.integration
def test_resnet3d_exports_match_pytorch_on_real_dicom_stacks(shared_datasets, tmp_path):
    """Study C's model, exported to a single self-contained ONNX file and to TorchScript, checked on the
    slice stacks of a real covid-ct-md-sample series."""
    data = {"spatial_dims": 3, "depth": 4, "normalize": "sample", "window": {"level": -600, "width": 1500}}
    run = make_checkpoint(tmp_path, model="resnet3d_18", size=32, data=data)
    predictor = load_predictor(run)
    stacks = stacks_3d(predictor.config.data, shared_datasets / "covid-ct-md-sample" / "COVID-19" / "P001")[:6]
    out = tmp_path / "export"
    for fmt in ("onnx", "torchscript"):
        result = export_model(run, fmt, out / f"model{SUFFIXES[fmt]}", check_batch=stacks)
        assert result.max_abs_diff < 1e-4
    onnx_probabilities = load_predictor(onnx=out / "model.onnx").predict_batch(stacks)
    np.testing.assert_allclose(onnx_probabilities, predictor.predict_batch(stacks), atol=1e-4)
    assert sorted(p.name for p in out.iterdir()) == [
        "model.onnx",
        "model.onnx.json",
        "model.torchscript.pt",
        "model.torchscript.pt.json",
    ]  # the weights are inside the .onnx, no .onnx.data beside it
