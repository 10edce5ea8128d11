"""Domain-adversarial training (``training.domain_adaptation``, :class:`DomainAdversarial`): the
gradient reversal, the loss hook of the loop, the config path through ``train()``, resume, bad input."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from covidscan.checkpoint import load_checkpoint
from covidscan.config import ConfigError, PhaseConfig, RunConfig, config_from_dict, load_config
from covidscan.data import DataError
from covidscan.inference import load_predictor
from covidscan.models import ClassifierModel
from covidscan.training import Callback, ClassificationLoss, TrainingLoop, train
from covidscan.training.domain import DomainAdversarial, dann_coefficient, reverse_gradient
from covidscan.training.history import read_history
from helpers import registered_model, write_image_folder


def test_the_reversal_layer_passes_values_and_flips_and_scales_the_gradient():
    features = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4)
    out = reverse_gradient(features, 0.25)
    assert torch.equal(out, features)
    out.backward(upstream)
    torch.testing.assert_close(features.grad, -0.25 * upstream)


def test_the_coefficient_ramps_from_zero_to_the_weight():
    values = [dann_coefficient(p / 10, 2.0) for p in range(11)]
    assert values[0] == 0.0
    assert values == sorted(set(values))  # strictly increasing
    assert 0.98 * 2.0 < values[-1] < 2.0
    assert dann_coefficient(1.5, 2.0) == values[-1]  # clamped past the end of the plan


def shifted_domains(shift: float, n: int = 32):
    """Source and target 1x8x8 images that differ only by an intensity offset (the 'site')."""
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(n, 1, 8, 8, generator=generator)
    target = torch.randn(n, 1, 8, 8, generator=generator) + shift
    labels = (source.mean(dim=(1, 2, 3)) > 0).long()
    return TensorDataset(source, labels), TensorDataset(target, torch.zeros(n, dtype=torch.long))


def no_norm_net() -> ClassifierModel:
    """No BatchNorm, so the offset between the sites stays visible in the features."""
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
    return ClassifierModel(backbone, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)))


def fit_with_domain_classifier(tmp_path, weight: float) -> TrainingLoop:
    source, target = shifted_domains(shift=2.0)
    torch.manual_seed(0)
    adversary = DomainAdversarial(DataLoader(target, batch_size=8, shuffle=True), weight=weight, hidden=16, lr=0.01)
    loop = TrainingLoop(
        no_norm_net(),
        DataLoader(source, batch_size=8, shuffle=True),
        None,
        phases=[PhaseConfig(epochs=12, lr=0.01)],
        criterion=ClassificationLoss("softmax", 2),
        config=RunConfig(),
        run_dir=tmp_path,
        class_names=["COVID", "normal"],
        callbacks=[adversary],
    )
    loop.fit()
    return loop


def test_the_reversed_gradient_makes_the_sites_harder_to_tell_apart(tmp_path):
    """Same data, seeds and domain classifier; only the reversal coefficient differs. With a negligible
    one the classifier separates the sites easily; with reversal the backbone hides the offset."""
    ignored = fit_with_domain_classifier(tmp_path / "ignored", weight=1e-6).history
    adversarial = fit_with_domain_classifier(tmp_path / "adversarial", weight=1.0).history
    assert {"domain_loss", "domain_accuracy", "domain_coefficient"} <= set(adversarial[-1])
    assert ignored[-1]["domain_accuracy"] > 0.9
    assert adversarial[-1]["domain_accuracy"] < ignored[-1]["domain_accuracy"] - 0.2
    assert adversarial[-1]["domain_loss"] > ignored[-1]["domain_loss"]
    coefficients = [row["domain_coefficient"] for row in adversarial]
    assert coefficients == sorted(coefficients) and coefficients[-1] > 0.95


def tiny_net(num_classes: int = 2, in_channels: int = 1, pretrained: bool = False, weights: str | None = None):
    return no_norm_net()


def adaptation_config(source, target, tmp_path, **extra) -> RunConfig:
    return config_from_dict(
        {
            "output_dir": str(tmp_path / "runs"),
            "data": {"source": str(source), "image_size": 16, "channels": 1, "normalize": "sample"},
            "model": {"name": "tiny_dann_net"},
            "training": {
                "batch_size": 8,
                "phases": [{"epochs": 2, "lr": 0.01}],
                "domain_adaptation": {"target": target, "hidden": 8, **extra},
            },
        }
    )


class StopAfterFirstEpoch(Callback):
    def on_epoch_end(self, loop, metrics):
        raise KeyboardInterrupt  # after the epoch's checkpoints: a resumable interruption


def test_train_adapts_to_a_folder_and_a_manifest_resumes_and_saves_a_plain_model(image_folder, tmp_path):
    target = write_image_folder(tmp_path / "site-b", {"unsorted": 10}, seed=3)
    manifest = tmp_path / "site-c.csv"
    with manifest.open("w", newline="") as handle:  # a manifest without labels: they would be ignored anyway
        writer = csv.writer(handle)
        writer.writerow(["path"])
        writer.writerows([[str(p)] for p in sorted((target / "unsorted").iterdir())[:4]])
    config = adaptation_config(image_folder, [str(target), str(manifest)], tmp_path)
    run_dir = tmp_path / "run"
    with registered_model("tiny_dann_net", tiny_net):
        with pytest.raises(KeyboardInterrupt):
            train(config, run_dir=run_dir, callbacks=[StopAfterFirstEpoch()])
        saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")["training_state"]["callbacks"]["DomainAdversarial"]
        resumed = train(config, run_dir=run_dir, resume=True)
        predictor = load_predictor(run_dir / "checkpoints" / "best.pt")  # no domain classifier inside
    assert set(saved) == {"classifier", "optimizer"}
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    history = read_history(run_dir / "history.csv")
    assert all(0.0 <= row["domain_accuracy"] <= 1.0 for row in history)
    assert (run_dir / "plots" / "callback_metrics.png").is_file()  # the domain columns, plotted
    assert not any(key.startswith("domain") for key in predictor.torch_model.state_dict())


def test_bad_adaptation_settings_are_refused_with_the_key_and_the_fix(image_folder, tmp_path):
    empty = tmp_path / "empty-site"
    empty.mkdir()
    with (
        registered_model("tiny_dann_net", tiny_net),
        pytest.raises(DataError, match="domain_adaptation.target.*empty-site"),
    ):
        train(adaptation_config(image_folder, str(empty), tmp_path))
    with pytest.raises(ConfigError, match="domain_adaptation.weight must be > 0"):
        adaptation_config(image_folder, str(empty), tmp_path, weight=0)
    volumes = adaptation_config(image_folder, str(empty), tmp_path)
    volumes.data.spatial_dims = 3
    with pytest.raises(ConfigError, match="2D images"):
        train(volumes)


def test_the_cli_adapts_to_the_folders_given_with_adapt_to(image_folder, tmp_path):
    from covidscan.cli import main

    target = write_image_folder(tmp_path / "site-b", {"unsorted": 8}, seed=5)
    config_file = tmp_path / "run.yaml"
    adaptation_config(image_folder, "unused", tmp_path).save(config_file)  # the section's hidden width stays
    run_dir = tmp_path / "cli-run"
    with registered_model("tiny_dann_net", tiny_net):
        code = main(["train", "--config", str(config_file), "--run-dir", str(run_dir), "--adapt-to", str(target)])
    assert code == 0
    saved = load_config(run_dir / "config.yaml").training.domain_adaptation
    assert saved is not None and saved.targets == [str(target)] and saved.hidden == 8
    assert "domain_accuracy" in read_history(run_dir / "history.csv")[-1]
