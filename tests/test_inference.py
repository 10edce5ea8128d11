"""The one inference path: PyTorch and ONNX agree in evaluation, NaN never gets a label, resume keys on
normalised paths, broken model files are one-line errors, an ONNX model is not explainable."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from covidscan.cli import main
from covidscan.config import config_from_dict
from covidscan.data import DataError, load_samples
from covidscan.evaluation import evaluate, predict
from covidscan.explain import explain_image
from covidscan.inference import (
    NON_FINITE_OUTPUT,
    ExplainUnavailable,
    NonFiniteOutputError,
    Predictor,
    load_predictor,
    metadata_path,
)
from covidscan.models import ClassifierModel
from covidscan.serving import export_model, predict_files
from helpers import CLASSES, make_checkpoint, png_bytes, write_image_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("inference"))


@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    return export_model(run, "onnx", tmp_path_factory.mktemp("onnx") / "model.onnx").path


@pytest.fixture
def images(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images", {"COVID": 4, "normal": 4})


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_onnx_and_pytorch_evaluations_agree(run, onnx_export, images, capsys):
    torch_eval = evaluate(run, data=images, n_bootstrap=0, write=False)
    onnx_eval = evaluate(None, data=images, n_bootstrap=0, onnx=onnx_export, write=False)
    assert onnx_eval.predictions.paths == torch_eval.predictions.paths
    np.testing.assert_allclose(onnx_eval.predictions.proba, torch_eval.predictions.proba, atol=1e-4)
    assert (onnx_eval.report.engine, torch_eval.report.engine) == ("onnxruntime", "pytorch")
    assert onnx_eval.report.model_version == torch_eval.report.model_version
    for name in ("accuracy", "roc_auc"):
        assert onnx_eval.report.metrics[name].value == pytest.approx(torch_eval.report.metrics[name].value, abs=1e-6)
    code = main(["evaluate", "--onnx", str(onnx_export), "--checkpoint", str(run), "--data", str(images)])
    assert code == 0 and "onnxruntime" in capsys.readouterr().out
    assert (run / "evaluation" / "images-all-onnx" / "metrics.json").is_file()


class NanWhenBright(nn.Module):
    """Finite logits for dark images, NaN for bright ones: a stand-in for any model output gone bad."""

    spatial_dims = 2

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3))[:, None]
        logits = self.linear(mean)
        return torch.where(mean > 0.5, torch.full_like(logits, float("nan")), logits)


@pytest.fixture
def nan_predictor() -> Predictor:
    config = config_from_dict({"data": {"image_size": 32, "channels": 1, "normalize": "none"}})
    return Predictor.from_model(NanWhenBright(), config, CLASSES)


def test_non_finite_outputs_become_error_rows_never_labels(nan_predictor, images, tmp_path):
    """Class "normal" images are bright (write_image_folder), so the model's output is NaN for them."""
    summary = predict_files(nan_predictor, [images], tmp_path / "out.csv", batch_size=3, progress=False)
    rows = read_rows(summary.out)
    bad = [r for r in rows if "/normal/" in r["path"]]
    good = [r for r in rows if "/COVID/" in r["path"]]
    assert (summary.predicted, summary.failed) == (4, 4)
    assert all(r["error"] == NON_FINITE_OUTPUT and r["predicted_label"] == "" for r in bad)
    assert all(r[f"prob_{c}"] == "" for r in bad for c in CLASSES)
    assert all(r["predicted_label"] in CLASSES and not r["error"] for r in good)
    assert all(np.isfinite(float(r[f"prob_{c}"])) for r in good for c in CLASSES)
    with pytest.raises(NonFiniteOutputError):
        nan_predictor.predict_pixels(np.ones((32, 32), np.float32))
    with pytest.raises(DataError, match="not finite"):
        predict(nan_predictor, load_samples(images).samples, batch_size=4)


def test_api_refuses_a_non_finite_output(monkeypatch, run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import covidscan.serving.app as app_module

    nan = Predictor.from_model(
        NanWhenBright(), config_from_dict({"data": {"image_size": 32, "channels": 1, "normalize": "none"}}), CLASSES
    )
    monkeypatch.setattr(app_module, "load_predictor", lambda *args, **kwargs: nan)
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20), 250, np.uint8)).save(buffer, format="PNG")
    with TestClient(app_module.create_app(run)) as client:
        response = client.post("/v1/predict", files={"file": ("bright.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 422 and response.json()["error"] == "non_finite_output"
        dark = client.post("/v1/predict", files={"file": ("dark.png", png_bytes(), "image/png")})
        assert dark.status_code == 200 and dark.json()["predicted_label"] in CLASSES
        assert any("Research use only" in w for w in dark.json()["warnings"])


def test_resume_matches_relative_and_absolute_spellings(run, images, tmp_path, monkeypatch):
    predictor = load_predictor(run)
    out = tmp_path / "out.csv"
    monkeypatch.chdir(images.parent)
    first = predict_files(predictor, ["images"], out, progress=False)
    second = predict_files(predictor, [images, images / "COVID" / "COVID (0).png"], out, progress=False)
    assert (first.predicted, second.predicted, second.skipped) == (8, 0, 8)
    assert len(read_rows(out)) == 8


def test_resume_with_another_model_or_tta_is_refused(run, images, tmp_path):
    out = tmp_path / "out.csv"
    predict_files(load_predictor(run), [images], out, progress=False)
    with pytest.raises(ValueError, match="tta"):
        predict_files(load_predictor(run, tta="identity,hflip"), [images], out, progress=False)
    other = make_checkpoint(tmp_path / "other", epoch=5)
    with pytest.raises(ValueError, match="model_version"):
        predict_files(load_predictor(other), [images], out, progress=False)


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all", "truncated"])
def test_broken_onnx_is_a_one_line_error(onnx_export, images, tmp_path, capsys, content):
    broken = tmp_path / "broken.onnx"
    data = onnx_export.read_bytes()
    broken.write_bytes(data[: len(data) // 3] if content == "truncated" else content)
    shutil.copyfile(metadata_path(onnx_export), metadata_path(broken))
    code = main(["predict", "--onnx", str(broken), "--input", str(images), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(broken) in err and "export it again" in err
    assert not (tmp_path / "p.csv").exists()


def test_an_onnx_model_cannot_be_explained_but_its_checkpoint_can(run, onnx_export, images, tmp_path, capsys):
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    with pytest.raises(ExplainUnavailable, match="cannot be explained"):
        explain_image(load_predictor(onnx=onnx_export), image)
    code = main(["explain", "--checkpoint", str(onnx_export), "--input", str(images), "--out", str(tmp_path / "x")])
    assert code == 2 and "cannot be explained" in capsys.readouterr().err
    both = load_predictor(run, onnx=onnx_export)
    assert both.engine == "onnxruntime" and both.explainable
    assert explain_image(both, image).map.shape == (32, 32)


def test_onnx_with_a_different_checkpoint_is_refused(onnx_export, tmp_path):
    other = make_checkpoint(tmp_path, epoch=7)
    with pytest.raises(ValueError, match="not the same model"):
        load_predictor(other, onnx=onnx_export)


def test_in_memory_predictor_matches_the_module():
    torch.manual_seed(0)
    model = ClassifierModel(
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
    ).eval()
    config = config_from_dict({"data": {"image_size": 16, "channels": 1, "normalize": "none"}})
    predictor = Predictor.from_model(model, config, CLASSES)
    batch = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        expected = torch.softmax(model(batch), dim=1).numpy()
    np.testing.assert_allclose(predictor.predict_batch(batch), expected, atol=1e-6)
    assert predictor.torch_model is model and predictor.engine == "pytorch"
