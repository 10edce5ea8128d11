"""Shortcut audit: planted non-pathology signals are found, clean data shows none, training warns."""

from __future__ import annotations

import io
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from covidscan.cli import main
from covidscan.data.records import Sample, SampleSet
from covidscan.data.shortcuts import (
    ShortcutWarning,
    audit_shortcuts,
    jpeg_quality,
    verdict,
    warn_cheap_shortcuts,
)
from covidscan.explain.lung_check import cam_outside_lung_share


def _write(root, classes: dict[str, dict], per_class: int = 24, seed: int = 0) -> SampleSet:
    """Random-texture images per class; ``classes`` gives each class's size, format and frame value."""
    rng = np.random.default_rng(seed)
    samples = []
    for label, spec in classes.items():
        (root / label).mkdir(parents=True)
        width, height = spec.get("size", (48, 48))
        for i in range(per_class):
            pixels = rng.integers(40, 200, size=(height, width)).astype(np.uint8)
            if "frame" in spec:
                pixels[:3], pixels[-3:], pixels[:, :3], pixels[:, -3:] = (spec["frame"],) * 4
            path = root / label / f"{i}.{spec.get('format', 'png')}"
            options = {"quality": spec.get("quality", 90)} if spec.get("format") == "jpg" else {}
            Image.fromarray(pixels).save(path, **options)
            samples.append(Sample(str(path), label, patient_id=f"{label}-{i // 2}"))
    return SampleSet(samples, sorted(classes))


def _ct_like_lungs(side: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side] / side
    return (((xx - 0.32) / 0.12) ** 2 + ((yy - 0.5) / 0.2) ** 2 <= 1) | (
        ((xx - 0.68) / 0.12) ** 2 + ((yy - 0.5) / 0.2) ** 2 <= 1
    )


def _ct_like_slice(side: int = 64, seed: int | None = None) -> np.ndarray:
    """A body ellipse with two dark lungs (8-bit); ``seed`` adds a little noise."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1
    image = np.where(_ct_like_lungs(side), 0.3, np.where(body, 0.85, 0.02))
    if seed is not None:
        image = image + np.random.default_rng(seed).normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _rows(report):
    return {row["signal"]: row for row in report["signals"]}


def test_planted_size_and_format_shortcuts_are_found_and_clean_signals_are_not(tmp_path):
    data = _write(
        tmp_path,
        {"COVID": {"size": (56, 48), "format": "jpg", "quality": 70}, "normal": {"size": (48, 48)}},
    )
    report = audit_shortcuts(data, signals=["width", "aspect", "jpeg_quality", "mode", "height"], n_bootstrap=200)
    rows = _rows(report)
    for name in ("width", "aspect", "jpeg_quality", "mode"):
        assert rows[name]["auc"] > 0.95 and rows[name]["verdict"] == "strong shortcut", name
        assert rows[name]["ci_low"] <= rows[name]["auc"] <= rows[name]["ci_high"]
    assert rows["height"]["auc"] == 0.5 and rows["height"]["verdict"] == "none"  # constant: exactly chance
    assert report["cross_validation"].startswith("StratifiedGroupKFold") and report["n_patients"] == 24


def test_a_bright_frame_is_a_border_shortcut_and_random_content_is_not(tmp_path):
    data = _write(tmp_path, {"COVID": {"frame": 255}, "normal": {"frame": 0}})
    rows = _rows(audit_shortcuts(data, signals=["border", "file_size"], n_bootstrap=100, workers=1))
    assert rows["border"]["verdict"] == "strong shortcut"
    clean = _write(tmp_path / "clean", {"COVID": {}, "normal": {}}, seed=1)
    rows = _rows(audit_shortcuts(clean, signals=["thumbnail", "outside_lungs"], n_bootstrap=100, workers=1))
    assert rows["thumbnail"]["auc"] < 0.8 and rows["outside_lungs"]["auc"] < 0.8


def test_without_patient_ids_folds_are_stratified(tmp_path):
    data = _write(tmp_path, {"COVID": {"size": (56, 48)}, "normal": {}})
    plain = SampleSet([Sample(s.path, s.label) for s in data.samples], data.class_names)
    report = audit_shortcuts(plain, signals=["width"], n_bootstrap=0)
    assert report["cross_validation"].startswith("StratifiedKFold") and report["n_patients"] is None
    assert _rows(report)["width"]["ci_low"] is None


def test_too_few_patients_fall_back_to_stratified_folds_without_sklearn_warnings(tmp_path):
    data = _write(tmp_path, {"COVID": {"size": (56, 48)}, "normal": {}}, per_class=6)
    one_patient = SampleSet([Sample(s.path, s.label, patient_id=s.label) for s in data.samples], data.class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The groups parameter is ignored by StratifiedKFold"
        report = audit_shortcuts(one_patient, signals=["width"], n_bootstrap=0, workers=1)
    assert report["cross_validation"].startswith("StratifiedKFold")


def test_three_classes_use_macro_one_vs_rest_auc(tmp_path):
    data = _write(tmp_path, {"A": {"size": (40, 48)}, "B": {"size": (48, 48)}, "C": {"size": (56, 48)}}, per_class=12)
    report = audit_shortcuts(data, signals=["width"], n_bootstrap=50)
    assert report["auc"] == "macro one-vs-rest ROC AUC"
    assert _rows(report)["width"]["auc"] > 0.95


def test_jpeg_quality_is_recovered_from_the_quantisation_table():
    pixels = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    for quality in (30, 50, 75, 90, 95):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        assert abs(jpeg_quality(Image.open(buffer).quantization) - quality) <= 2
    assert jpeg_quality(None) == -1


def test_verdicts():
    assert [verdict(a) for a in (0.9, 0.7, 0.6, 0.5, None)] == [
        "strong shortcut",
        "shortcut",
        "weak",
        "none",
        "undefined",
    ]


def test_training_data_with_a_cheap_shortcut_warns_once_and_clean_data_stays_quiet(tmp_path):
    data = _write(tmp_path, {"COVID": {"size": (56, 48)}, "normal": {}})
    with pytest.warns(ShortcutWarning, match="width"):
        found = warn_cheap_shortcuts(data)
    assert "width" in dict(found)
    clean = _write(tmp_path / "clean", {"COVID": {}, "normal": {}}, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortcutWarning)
        assert warn_cheap_shortcuts(clean) == []


def test_cam_mass_outside_the_lungs():
    yy, xx = np.mgrid[0:96, 0:96] / 96
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1
    lungs = (((xx - 0.32) / 0.12) ** 2 + ((yy - 0.5) / 0.2) ** 2 <= 1) | (
        ((xx - 0.68) / 0.12) ** 2 + ((yy - 0.5) / 0.2) ** 2 <= 1
    )
    image = np.where(lungs, 0.3, np.where(body, 0.85, 0.02)).astype(np.float32)
    assert cam_outside_lung_share(lungs.astype(np.float32), image, lungs) == 0.0
    assert cam_outside_lung_share((~lungs).astype(np.float32), image, lungs) == 1.0
    uniform = cam_outside_lung_share(np.ones((24, 24), np.float32), image, lungs)  # resized to the image
    assert uniform == pytest.approx(1 - lungs.mean(), abs=0.02)
    assert np.isnan(cam_outside_lung_share(np.zeros((96, 96)), image, lungs))
    assert 0.0 <= cam_outside_lung_share(lungs.astype(np.float32), image) < 0.1  # mask found by lung_mask_2d


def test_cli_writes_json_markdown_and_chart(tmp_path, capsys):
    _write(tmp_path / "data", {"COVID": {"size": (56, 48)}, "normal": {}}, per_class=10)
    out = tmp_path / "audit"
    argv = ["data", "shortcuts", str(tmp_path / "data"), "--signals", "width", "file_size", "--bootstrap", "50"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "| width (image width in pixels) |" in capsys.readouterr().out
    report = json.loads((out / "shortcuts.json").read_text())
    assert [row["signal"] for row in report["signals"]] == ["width", "file_size"]
    assert (out / "shortcuts.md").read_text().startswith("## Shortcut audit")
    assert (out / "shortcuts.png").stat().st_size > 0
    assert main([*argv[:3], "--signals", "colour"]) == 2


def test_cam_lung_check_runs_a_model_over_test_images(tmp_path):
    from covidscan.explain.lung_check import cam_lung_check
    from covidscan.inference import load_predictor
    from helpers import make_checkpoint

    lungs = _ct_like_lungs()
    samples = []
    for i in range(3):
        path = tmp_path / f"slice{i}.png"
        Image.fromarray(_ct_like_slice()).save(path)
        samples.append(Sample(str(path), "COVID"))
    loaded = load_predictor(make_checkpoint(tmp_path, size=32))
    result = cam_lung_check(loaded, samples, max_images=2)  # a random-init model: its maps may be all zero
    assert result["n_images"] == 2 and result["data_lung"] == "none"
    uniform = SimpleNamespace(map=np.ones((32, 32), np.float32))
    result = cam_lung_check(loaded, samples, explain=lambda *args: uniform)
    assert result["n_images"] == result["n_measured"] == 3
    assert result["mean_outside_share"] == pytest.approx(1 - lungs.mean(), abs=0.05)


def test_evaluate_writes_the_lung_check_into_its_report(tmp_path):
    from covidscan.evaluation import evaluate
    from helpers import make_checkpoint

    data = tmp_path / "data"
    for label in ("COVID", "normal"):
        for i in range(3):
            (data / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_ct_like_slice(seed=i)).save(data / label / f"{i}.png")
    run = make_checkpoint(tmp_path, size=32)
    report = evaluate(run, data, out_dir=tmp_path / "eval", n_bootstrap=0, grid_size=0, cam_lung=4).report
    assert report.cam_lung is not None and report.cam_lung["n_images"] == 4
    payload = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert payload["cam_lung"]["n_images"] == 4
    assert "## Where the model looks" in (tmp_path / "eval" / "report.md").read_text()
    plain = evaluate(run, data, out_dir=tmp_path / "plain", n_bootstrap=0, grid_size=0).report
    assert plain.cam_lung is None and "cam_lung" not in plain.to_dict()


def test_cli_adds_the_model_check_of_a_run(tmp_path, capsys):
    from covidscan.data.splits import save_splits
    from helpers import make_checkpoint

    data = _write(tmp_path / "data", {"COVID": {}, "normal": {}}, per_class=6)
    run = make_checkpoint(tmp_path, size=32)
    save_splits(SampleSet([s.with_split("test") for s in data.samples], data.class_names), run / "splits.csv")
    argv = ["data", "shortcuts", str(tmp_path / "data"), "--signals", "width", "--bootstrap", "0"]
    assert main([*argv, "--cam-run", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "Model check" in capsys.readouterr().out
    check = json.loads((tmp_path / "out" / "shortcuts.json").read_text())["model_check"]
    assert check["n_images"] == 12 and check["run"] == str(run)
