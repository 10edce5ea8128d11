"""Explainability: CAMs find the evidence on a task whose evidence is known, in 2D and 3D, without leaks."""

from __future__ import annotations

import csv
import gc
import io
import logging
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from covidscan.cli import main as cli_main
from covidscan.config import config_from_dict
from covidscan.data import DataError, LeakageWarning
from covidscan.explain import CAM_METHODS, compute_cam, explain_files, explain_image, resolve_target_layer
from covidscan.explain.overlay import empty_map_warning, render_overlay
from covidscan.inference import Predictor, load_predictor
from covidscan.models import ClassifierModel, create_model
from covidscan.training import train

SIZE, BLOB, MARGIN = 32, 8, 4  # image side, blob side, tolerance (the 4x4 cnn1 map has 8 px cells)


def blob_image(rng: np.random.Generator, with_blob: bool) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Noisy background; class "blob" adds a bright square somewhere; returns its top-left corner."""
    image = np.clip(rng.normal(0.35, 0.08, (SIZE, SIZE)), 0, 1).astype(np.float32)
    if not with_blob:
        return image, None
    top, left = (int(v) for v in rng.integers(0, SIZE - BLOB, 2))
    image[top : top + BLOB, left : left + BLOB] = 0.95
    return image, (top, left)


def peak_in_blob(cam: np.ndarray, corner: tuple[int, int]) -> bool:
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    top, left = corner
    return top - MARGIN <= row < top + BLOB + MARGIN and left - MARGIN <= col < left + BLOB + MARGIN


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory) -> Path:
    """cnn1 trained by the real trainer to tell images with a bright blob from images without."""
    root = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(0)
    for name in ("blob", "clear"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(64):
            image, _ = blob_image(rng, name == "blob")
            Image.fromarray((image * 255).astype(np.uint8)).save(root / "images" / name / f"{i}.png")
    config = config_from_dict(
        {
            "name": "blobs",
            "output_dir": str(root / "runs"),
            "data": {
                "source": str(root / "images"),
                "image_size": SIZE,
                "channels": 1,
                "normalize": "sample",
                "split": {"method": "stratified", "ratios": [0.75, 0.25, 0.0]},
            },
            "model": {"name": "cnn1"},
            "training": {"batch_size": 16, "phases": [{"epochs": 6, "lr": 0.003}]},
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeakageWarning)  # synthetic images have no patients to group
        return Path(train(config).run_dir)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_peaks_inside_the_blob_that_decides_the_class(blob_run, method):
    loaded = load_predictor(blob_run)
    blob = loaded.class_names.index("blob")
    rng = np.random.default_rng(1)  # held-out images, never seen in training
    images, corners = zip(*(blob_image(rng, True) for _ in range(30)))
    batch = torch.stack([loaded.transform(image) for image in images])
    result = compute_cam(loaded.torch_model, batch, method, samples=4)
    predicted_blob = (result.target == blob).numpy()
    assert predicted_blob.mean() >= 0.9, "the model did not learn the task; the CAM check would be meaningless"
    hits = [peak_in_blob(cam, corner) for cam, corner, ok in zip(result.maps.numpy(), corners, predicted_blob) if ok]
    assert np.mean(hits) >= 0.8
    assert result.maps.shape == (30, SIZE, SIZE)
    assert float(result.maps.min()) >= 0.0 and float(result.maps.max()) <= 1.0


def test_explain_image_names_classes_and_renders_png(blob_run):
    loaded = load_predictor(blob_run)
    image, _ = blob_image(np.random.default_rng(2), True)
    explanation = explain_image(loaded, image, "gradcampp", target_class="CLEAR")  # class names are case-insensitive
    assert explanation.target == "clear"
    assert explanation.predicted == max(explanation.probabilities, key=explanation.probabilities.get)
    assert sum(explanation.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert explanation.map.shape == (SIZE, SIZE)
    assert explanation.overlay_png_bytes.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="classes are"):
        explain_image(loaded, image, target_class="COVID")


def test_cli_writes_overlays_maps_and_reports_bad_files(blob_run, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray((blob_image(rng, True)[0] * 255).astype(np.uint8)).save(inputs / f"scan{i}.png")
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = cli_main(
        [
            "explain",
            "--checkpoint",
            str(blob_run),
            "--input",
            str(inputs),
            "--method",
            "smoothgradcampp",
            "--samples",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 1  # a bad file makes the run fail visibly, the good ones are still written
    assert "broken.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "explanations.csv",
        "scan0.npy",
        "scan0.png",
        "scan1.npy",
        "scan1.png",
    ]
    assert np.load(out / "scan0.npy").shape == (SIZE, SIZE)
    with open(out / "explanations.csv") as handle:
        assert [row["overlay"] for row in csv.DictReader(handle)] == ["scan0.png", "scan1.png"]
    assert cli_main(["explain", "--checkpoint", str(blob_run), "--input", str(inputs), "--layer", "no.such.layer"]) == 2


def tiny_3d_model() -> ClassifierModel:
    backbone = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool3d(2),
        nn.Conv3d(4, 8, 3, padding=1),
        nn.ReLU(inplace=True),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 3))
    return ClassifierModel(backbone, head, spatial_dims=3)


@pytest.mark.parametrize("method", CAM_METHODS)
def test_3d_maps_have_the_volume_shape_and_depth(method):
    torch.manual_seed(0)
    volume = torch.rand(2, 1, 6, 20, 24)
    result = compute_cam(tiny_3d_model(), volume, method, target_class=2, samples=2)
    assert result.maps.shape == (2, 6, 20, 24)
    assert result.target.tolist() == [2, 2]
    with pytest.raises(ValueError, match="3D model"):
        compute_cam(tiny_3d_model(), torch.rand(1, 1, 20, 24), method)


def test_target_layer_is_the_models_cam_target_and_overridable():
    model = create_model("cnn1", num_classes=2, in_channels=1)
    assert resolve_target_layer(model) == ("backbone", model.backbone)
    earlier = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    result = compute_cam(model, torch.rand(1, 1, 32, 32), layer=earlier)
    assert result.layer == earlier and result.maps.shape == (1, 32, 32)
    with pytest.raises(ValueError, match="Did you mean"):
        resolve_target_layer(model, "backbone9")


def test_no_hooks_gradients_or_memory_leak_over_100_calls():
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 2))
    model = ClassifierModel(backbone, head)
    model.train()
    sentinels = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = sentinels[name].clone()
    x = torch.rand(1, 1, 16, 16)

    def call(i: int) -> None:
        result = compute_cam(model, x, CAM_METHODS[i % 3], samples=2)
        assert not result.maps.requires_grad and not result.logits.requires_grad

    for i in range(10):  # warm-up: allocator pools, lazy imports
        call(i)
    gc.collect()
    rss_before = _rss_bytes()
    tracemalloc.start()
    python_before = tracemalloc.get_traced_memory()[0]
    for i in range(100):
        call(i)
    gc.collect()
    python_growth = tracemalloc.get_traced_memory()[0] - python_before
    tracemalloc.stop()
    rss_growth = _rss_bytes() - rss_before

    assert python_growth < 256 * 1024, f"Python heap grew {python_growth} bytes over 100 calls"
    assert rss_growth < 16 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MiB over 100 calls"
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(p.grad, sentinels[name]) for name, p in model.named_parameters())
    assert model.training  # the caller's train/eval mode is restored


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def test_scan_explanation_covers_every_slice_of_the_scan(tmp_path):
    """A 10-slice NIfTI scan cut into 4-slice stacks: the stitched map spans all 10 slices."""
    import nibabel as nib

    hu = np.random.default_rng(4).normal(-600, 300, (20, 18, 10)).astype(np.float32)  # nibabel (x, y, z)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "scan.nii.gz")
    config = config_from_dict(
        {"data": {"spatial_dims": 3, "depth": 4, "image_size": 16, "channels": 1, "normalize": "sample"}}
    )
    loaded = Predictor.from_model(tiny_3d_model().eval(), config, ["CP", "NCP", "Normal"])
    explanation = explain_image(loaded, tmp_path / "scan.nii.gz", "gradcam")
    assert explanation.map.shape == (10, 16, 16)
    assert explanation.map.max() == pytest.approx(1.0)
    assert explanation.overlay_png_bytes.startswith(b"\x89PNG")
    with pytest.raises(DataError, match="by path"):
        explain_image(loaded, np.zeros((10, 16, 16)))


def _firebrick_pixels(png: bytes) -> int:
    """Dark-red pixels (the note's box) in the middle of the image panel, away from the colour bar."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    height, width = pixels.shape[:2]
    middle = pixels[int(height * 0.3) : int(height * 0.55), int(width * 0.3) : int(width * 0.7)]
    red, green, blue = middle[..., 0], middle[..., 1], middle[..., 2]
    return int(np.sum((red > 120) & (red - green > 80) & (red - blue > 80)))


def test_all_zero_map_is_said_on_the_overlay_in_the_csv_and_the_log(tmp_path, caplog):
    """Every class score falls with every activation, so Grad-CAM's ReLU leaves nothing: say so."""
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        head[2].weight.fill_(-1.0)
        head[2].bias.copy_(torch.tensor([0.0, 1.0]))
    config = config_from_dict(
        {"data": {"image_size": SIZE, "channels": 1, "normalize": "none"}, "model": {"name": "cnn1"}}
    )
    loaded = Predictor.from_model(ClassifierModel(backbone, head).eval(), config, ["COVID", "normal"])
    image, _ = blob_image(np.random.default_rng(4), True)
    explanation = explain_image(loaded, image, "gradcam")
    assert not explanation.map.any()
    assert "all zero" in explanation.warning and "'normal'" in explanation.warning
    assert _firebrick_pixels(explanation.overlay_png_bytes) > 100
    hot = np.zeros((SIZE, SIZE), np.float32)
    hot[:4, :4] = 1.0  # a map with heat in one corner: no note
    assert _firebrick_pixels(render_overlay(image, hot, "control")) == 0
    assert empty_map_warning(hot, "Grad-CAM", "normal") is None

    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "slice.png")
    with caplog.at_level(logging.WARNING, logger="covidscan.explain.explanation"):
        summary, failures = explain_files(loaded, [tmp_path / "slice.png"], tmp_path / "out", progress=False)
    assert not failures and "all zero" in caplog.text
    with open(summary) as handle:
        (row,) = csv.DictReader(handle)
    assert "all zero" in row["warning"]
