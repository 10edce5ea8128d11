"""The shipped study configs: every one validates, and each study's recipe trains end to end on a
tiny synthetic stand-in for its dataset (same folder/manifest shape and class names)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from covidscan.config import load_config
from covidscan.models import list_models
from helpers import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
STUDY_CONFIGS = [p for p in CONFIGS if p.name.startswith(("study_a_", "study_b_", "study_d_", "study_e_"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_names_a_registered_model(path):
    config = load_config(path)
    assert config.model.name in list_models()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("study_b_*.yaml")), ids=lambda p: p.name)
def test_study_b_stops_early_on_the_training_loss_as_keras_monitor_loss(path):
    stopping = load_config(path).training.early_stopping
    assert (stopping.monitor, stopping.patience, stopping.mode) == ("loss", 10, "min")


def test_each_study_ships_its_models():
    names = {p.stem for p in STUDY_CONFIGS}
    expected = {f"study_a_{m}" for m in ("cnn1", "cnn2", "cnn3", "resnet50", "vgg16", "alexnet")}
    expected |= {f"study_b_{m}" for m in ("sepconv", "resnet50", "xception", "mobilenet", "densenet121")}
    expected |= {f"study_d_{m}" for m in ("xception", "resnet50", "vgg16")} | {"study_e_resnet101"}
    assert expected <= names


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_study_data_paths_are_relative_to_the_project(path):
    source = load_config(path).data.source
    assert source.startswith("../shared/datasets/")


def _folder(root: Path, classes: list[str]) -> Path:
    return write_image_folder(root, dict.fromkeys(classes, 10), size=32)


def _manifest(root: Path) -> Path:
    """Two images per patient, eight patients per class, like covid-ct's metadata.csv."""
    write_image_folder(root, {"CT_COVID": 16, "CT_NonCOVID": 16}, size=32)
    path = root / "metadata.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        for folder, label in (("CT_COVID", "COVID"), ("CT_NonCOVID", "NonCOVID")):
            for i in range(16):
                writer.writerow([f"{folder}/{folder} ({i}).png", label, f"{label}-{i // 2}"])
    return path


# one config per study, with its dataset's shape (folder or patient manifest) and class names
STUDY_RUNS = {
    "study_a_cnn1": lambda root: _folder(root, ["COVID", "non-COVID"]),
    "study_b_sepconv": _manifest,
    "study_d_resnet50": lambda root: _folder(root, ["Covid", "Normal", "Viral Pneumonia"]),
    "study_e_resnet101": lambda root: _folder(root, ["COVID", "non-COVID"]),
}


@pytest.mark.parametrize("study", sorted(STUDY_RUNS))
def test_study_recipe_runs_end_to_end_on_a_tiny_stand_in(study, tmp_path):
    from covidscan.training import train

    source = STUDY_RUNS[study](tmp_path / "data")
    base = load_config(ROOT / "configs" / f"{study}.yaml")
    overrides = [
        f"data.source={source}",
        "data.image_size=32",
        "model.pretrained=false",
        "model.allow_random_frozen=true",  # offline: studies D and E then freeze a random backbone on purpose
        "training.batch_size=8",
        f"output_dir={tmp_path / 'runs'}",
    ]
    overrides += [f"training.phases.{i}.epochs=1" for i in range(len(base.training.phases))]
    config = load_config(ROOT / "configs" / f"{study}.yaml", overrides)
    result = train(config)
    assert len(result.history) == len(config.training.phases)  # one epoch per phase
    assert (result.run_dir / "checkpoints" / "best.pt").is_file()
    if config.data.split.ratios[2] > 0:
        assert result.test_metrics is not None


@pytest.mark.integration
@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_study_config_matches_its_real_dataset(path, shared_datasets, monkeypatch):
    """The shipped data path loads from the project root, with the positive class among its
    labels and, for patient-grouped splits, a patient id on every sample."""
    from covidscan.data import load_samples

    monkeypatch.chdir(ROOT)
    data = load_config(path).data
    samples = load_samples(data.source, classes=data.classes, label_map=data.label_map)
    assert data.positive_class in samples.class_names
    assert len(samples.class_names) >= 2 and len(samples.samples) > 100
    if data.split.method == "grouped":
        assert all(s.patient_id for s in samples.samples)
