"""The trainer: schedules, early stopping, class weights, heads, phases with freezing, resume."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch

from covidscan.checkpoint import load_checkpoint
from covidscan.config import ConfigError, PhaseConfig, SchedulerConfig, config_from_dict
from covidscan.training import Callback, ClassificationLoss, EarlyStopping, balanced_class_weights, train
from covidscan.training.optim import build_optimizer, build_schedule
from covidscan.training.trainer import check_weights_run


def tiny_config(source: Path, tmp_path: Path, overrides: list[str] = ()):  # type: ignore[assignment]
    """32 px grayscale, cnn1, no test split (evaluation is covered by the demo test)."""
    raw = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "source": str(source),
            "image_size": 32,
            "channels": 1,
            "normalize": "sample",
            "split": {"method": "stratified", "ratios": [0.75, 0.25, 0.0]},
        },
        "model": {"name": "cnn1"},
        "training": {"batch_size": 8, "phases": [{"epochs": 2, "lr": 0.001}]},
    }
    return config_from_dict(raw, list(overrides))


def _steps(optimizer: torch.optim.Optimizer, schedule, n: int) -> None:
    for _ in range(n):
        optimizer.step()
        schedule.step_batch()


def test_exponential_schedule_matches_keras_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    phase = PhaseConfig(lr=0.015, scheduler=SchedulerConfig(name="exponential", decay_steps=100, decay_rate=0.96))
    optimizer = build_optimizer(phase, [param])
    schedule = build_schedule(phase.scheduler, optimizer)
    _steps(optimizer, schedule, 37)
    schedule.step_epoch()  # per-step schedules ignore epoch ends
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.015 * 0.96 ** (37 / 100))


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs():
    param = torch.nn.Parameter(torch.zeros(1))
    phase = PhaseConfig(lr=1e-3, scheduler=SchedulerConfig(name="step", step_size=3, gamma=0.1))
    optimizer = build_optimizer(phase, [param])
    schedule = build_schedule(phase.scheduler, optimizer)
    lrs = []
    for _ in range(7):
        _steps(optimizer, schedule, 2)  # per-epoch schedules ignore steps
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step_epoch()
    assert lrs == pytest.approx([1e-3] * 3 + [1e-4] * 3 + [1e-5])


def test_cosine_schedule_anneals_to_min_lr_over_the_phase():
    param = torch.nn.Parameter(torch.zeros(1))
    phase = PhaseConfig(epochs=4, lr=1e-3, scheduler=SchedulerConfig(name="cosine", min_lr=1e-5))
    optimizer = build_optimizer(phase, [param])
    schedule = build_schedule(phase.scheduler, optimizer, phase.epochs)
    lrs = []
    for _ in range(phase.epochs + 1):
        _steps(optimizer, schedule, 2)  # per-epoch schedules ignore steps
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step_epoch()
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(5)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(1e-5)


def test_early_stopping_waits_patience_epochs_after_the_best():
    stopper = EarlyStopping("val_loss", patience=2, mode="min", min_delta=0.05)
    losses = [1.0, 0.9, 0.88, 0.87]  # 0.88 and 0.87 improve by less than min_delta
    stops = [stopper.update(epoch, {"val_loss": value}) for epoch, value in enumerate(losses, 1)]
    assert stops == [False, False, False, True]
    assert stopper.monitor.best_epoch == 2

    maximise = EarlyStopping("val_accuracy", patience=1, mode="max")
    assert [maximise.update(e, {"val_accuracy": v}) for e, v in enumerate([0.5, 0.6, 0.6], 1)] == [False, False, True]


def test_balanced_class_weights_and_weighted_loss():
    weights = balanced_class_weights([0, 0, 0, 1], ["COVID", "normal"])
    assert weights.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    with pytest.raises(ValueError, match="normal"):
        balanced_class_weights([0, 0], ["COVID", "normal"])

    logits, targets = torch.randn(4, 2), torch.tensor([0, 0, 0, 1])
    plain = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    weighted = ClassificationLoss("softmax", 2, weights)(logits, targets)
    assert weighted.item() == pytest.approx((plain * weights[targets]).mean().item(), rel=1e-6)


def test_sigmoid_head_uses_binary_cross_entropy_on_one_hot_targets():
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nn.functional.one_hot(targets, 3).float()
    )
    assert ClassificationLoss("sigmoid", 3)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_train_with_sigmoid_head_exponential_decay_and_class_weights(image_folder, tmp_path):
    config = tiny_config(
        image_folder,
        tmp_path,
        [
            "model.head=sigmoid",
            "training.class_weights=balanced",
            "training.grad_clip=1.0",
            "training.phases.0.scheduler={name: exponential, decay_steps: 5, decay_rate: 0.5}",
        ],
    )
    result = train(config)
    steps_per_epoch = math.ceil(18 / 8)  # 24 images, 75% train
    assert [row["epoch"] for row in result.history] == [1, 2]
    for row in result.history:
        assert row["lr"] == pytest.approx(0.001 * 0.5 ** (row["epoch"] * steps_per_epoch / 5))
        assert math.isfinite(row["loss"]) and 0 <= row["val_accuracy"] <= 1
    for name in (
        "config.yaml",
        "splits.csv",
        "label_map.json",
        "history.csv",
        "metrics.json",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "plots/accuracy.png",
        "plots/loss.png",
    ):
        assert (result.run_dir / name).is_file(), name


class StateRecorder(Callback):
    """Keeps the weights saved in last.pt after each epoch."""

    def __init__(self):
        self.states = {}

    def on_epoch_end(self, loop, metrics):
        payload = torch.load(loop.run_dir / "checkpoints" / "last.pt", weights_only=False)
        self.states[loop.epoch] = payload["state_dict"]


def test_head_only_phase_leaves_the_backbone_unchanged(image_folder, tmp_path):
    config = tiny_config(
        image_folder,
        tmp_path,
        [
            "training.phases=[{epochs: 2, lr: 0.01, trainable: head}, {epochs: 1, lr: 0.01, optimizer: sgd}]",
            "model.allow_random_frozen=true",  # cnn1 has no pretrained weights; freezing random layers is the point
        ],
    )
    recorder = StateRecorder()
    result = train(config, callbacks=[recorder])
    assert [row["phase"] for row in result.history] == [1, 1, 2]
    first, second, third = (recorder.states[e] for e in (1, 2, 3))
    backbone = [k for k in first if k.startswith("backbone.")]
    head = [k for k in first if k.startswith("head.") and k.endswith("weight")]
    assert backbone and head
    assert all(torch.equal(first[k], second[k]) for k in backbone)  # frozen in phase 1
    assert any(not torch.equal(first[k], second[k]) for k in head)
    assert any(not torch.equal(second[k], third[k]) for k in backbone)  # trained in phase 2


def test_a_run_directory_as_model_weights_starts_from_that_runs_backbone(image_folder, tmp_path):
    """Fine-tuning at a new site: ``model.weights=RUN`` starts from the run's trained backbone (so a
    head-only phase is no frozen *random* backbone) and a fresh head."""
    shipped = train(tiny_config(image_folder, tmp_path), run_dir=tmp_path / "shipped")
    trained = load_checkpoint(shipped.run_dir)["state_dict"]
    overrides = [f"model.weights={shipped.run_dir}", "training.phases=[{epochs: 1, lr: 0.01, trainable: head}]"]
    recorder = StateRecorder()
    train(tiny_config(image_folder, tmp_path, overrides), callbacks=[recorder])
    tuned = recorder.states[1]
    backbone = [k for k in trained if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    assert backbone and all(torch.equal(tuned[k], trained[k]) for k in backbone)
    assert any(not torch.equal(tuned[k], trained[k]) for k in tuned if k.startswith("head."))


def test_fine_tuning_a_run_with_other_preprocessing_warns_naming_each_difference(image_folder, tmp_path):
    shipped = train(tiny_config(image_folder, tmp_path, ["data.intensity=clahe"]), run_dir=tmp_path / "shipped")
    same = tiny_config(image_folder, tmp_path, [f"model.weights={shipped.run_dir}", "data.intensity=clahe"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same preprocessing: silent
        check_weights_run(same)
    other = tiny_config(image_folder, tmp_path, [f"model.weights={shipped.run_dir}", "data.normalize=imagenet"])
    with pytest.warns(
        UserWarning, match=r"data.normalize 'sample' there, 'imagenet' here; data.intensity 'clahe' there"
    ):
        check_weights_run(other)


def test_early_stopping_ends_the_phase(image_folder, tmp_path):
    config = tiny_config(
        image_folder,
        tmp_path,
        [
            "training.phases.0.epochs=6",
            "training.phases.0.lr=1e-9",
            "training.early_stopping={monitor: val_accuracy, mode: max, patience: 1, min_delta: 0.5}",
        ],
    )
    result = train(config)
    assert len(result.history) == 2


class Interrupt(Callback):
    def on_epoch_end(self, loop, metrics):
        if loop.epoch == 1:
            raise KeyboardInterrupt


def test_resume_continues_after_an_interruption_with_nothing_lost(image_folder, tmp_path):
    overrides = [
        "training.phases=[{epochs: 2, lr: 0.003, trainable: head}, {epochs: 2, lr: 0.001}]",
        "model.allow_random_frozen=true",
        "data.augment.hflip=true",
    ]
    reference = train(tiny_config(image_folder, tmp_path, overrides), run_dir=tmp_path / "reference")
    config = tiny_config(image_folder, tmp_path, overrides)
    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir=run_dir, callbacks=[Interrupt()])
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    resumed = train(config, run_dir=run_dir, resume=True)

    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    with (run_dir / "history.csv").open() as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4]
    metrics = ("loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "lr")
    assert [[row[k] for k in metrics] for row in resumed.history] == [
        [row[k] for k in metrics] for row in reference.history
    ]  # bit-exact: the same batches, augmentation and optimizer state as the uninterrupted run
    resumed_weights = load_checkpoint(run_dir / "checkpoints" / "last.pt")["state_dict"]
    reference_weights = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(resumed_weights[k], reference_weights[k]) for k in reference_weights)


def test_val_monitor_without_validation_split_is_a_config_error(image_folder, tmp_path):
    config = tiny_config(image_folder, tmp_path, ["data.split.ratios=[1.0, 0.0, 0.0]"])
    with pytest.raises(ConfigError, match="checkpoint_monitor"):
        train(config)


def test_the_same_trainer_trains_a_3d_model_on_volumes(tmp_path):
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    for offset, name in enumerate(("COVID", "normal")):
        (tmp_path / "scans" / name).mkdir(parents=True)
        for scan in range(4):
            hu = rng.normal(-800 + 400 * offset, 50, (16, 16, 8)).astype(np.float32)  # nibabel (x, y, z)
            nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "scans" / name / f"scan{scan}.nii.gz"))
    config = tiny_config(
        tmp_path / "scans",
        tmp_path,
        [
            "data.spatial_dims=3",
            "data.depth=4",
            "data.image_size=16",
            "model.name=resnet3d_18",
            "data.split.ratios=[0.5, 0.5, 0.0]",
            "training.phases.0.epochs=1",
        ],
    )
    result = train(config)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])
    assert (result.run_dir / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize("trainable", ["head", "last:2"])
def test_a_frozen_random_backbone_is_refused_before_anything_is_written(image_folder, tmp_path, trainable):
    config = tiny_config(image_folder, tmp_path, [f"training.phases=[{{epochs: 1, trainable: '{trainable}'}}]"])
    assert not config.model.pretrained and config.model.weights is None
    with pytest.raises(ConfigError, match=r"training\.phases\.0\.trainable .*allow_random_frozen"):
        train(config)
    assert not (tmp_path / "runs").exists()


def test_freezing_after_a_full_phase_or_when_allowed_is_accepted():
    from covidscan.training.distributed import DistContext
    from covidscan.training.trainer import check_plan

    trained_first = config_from_dict(
        {"training": {"phases": [{"trainable": "all"}, {"trainable": "head"}]}, "model": {"pretrained": False}}
    )
    check_plan(trained_first, DistContext())
    allowed = config_from_dict(
        {"training": {"phases": [{"trainable": "head"}]}, "model": {"pretrained": False, "allow_random_frozen": True}}
    )
    check_plan(allowed, DistContext())
