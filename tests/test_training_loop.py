"""The training loop on its own: in-memory data, the hook order, stopping, callback state through a
resume, the EMA callback."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from covidscan.checkpoint import load_checkpoint
from covidscan.config import PhaseConfig, RunConfig, config_from_dict
from covidscan.inference import load_predictor
from covidscan.models import ClassifierModel
from covidscan.training import (
    EMA,
    Callback,
    ClassificationLoss,
    HistoryWriter,
    LastCheckpoint,
    TrainingLoop,
    train,
)
from helpers import registered_model


def tiny_net(num_classes: int = 2, in_channels: int = 1, pretrained: bool = False, weights: str | None = None):
    backbone = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    return ClassifierModel(backbone, head)


def in_memory_loop(
    tmp_path, callbacks, phases=None, images: int = 12, model: nn.Module | None = None, shuffle: bool = False
) -> TrainingLoop:
    """A loop over 12 random 8x8 images in batches of 4 (3 steps per epoch), no validation; 3 epochs
    in one phase unless ``phases`` say otherwise; a fresh ``tiny_net`` unless ``model`` is given."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(images, 1, 8, 8, generator=generator), torch.arange(images) % 2)
    return TrainingLoop(
        model if model is not None else tiny_net(),
        DataLoader(data, batch_size=4, shuffle=shuffle),
        None,
        phases=phases or [PhaseConfig(epochs=3, lr=0.01)],
        criterion=ClassificationLoss("softmax", 2),
        config=RunConfig(),
        run_dir=tmp_path,
        class_names=["COVID", "normal"],
        callbacks=callbacks,
    )


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_fit_start(self, loop):
        self.calls.append("fit_start")

    def on_phase_start(self, loop):
        self.calls.append(f"phase_start {loop.phase_index}")

    def on_epoch_start(self, loop):
        self.calls.append(f"epoch_start {loop.epoch}")

    def on_train_batch_end(self, loop, loss):
        assert loss.requires_grad is False and loss.ndim == 0  # the detached batch loss, on the device
        self.calls.append(f"batch {loop.step}")

    def on_epoch_end(self, loop, metrics):
        self.calls.append(f"epoch_end {metrics['epoch']}")

    def on_fit_end(self, loop):
        self.calls.append("fit_end")


def test_the_loop_trains_in_memory_tensors_and_calls_the_hooks_in_order(tmp_path):
    recorder = Recorder()
    phases = [PhaseConfig(epochs=1, lr=0.01, trainable="head"), PhaseConfig(epochs=1, lr=0.01)]
    loop = in_memory_loop(tmp_path, [recorder, LastCheckpoint(), HistoryWriter()], phases)
    loop.fit()
    assert recorder.calls == [
        "fit_start",
        "phase_start 0",
        "epoch_start 1",
        "batch 1",
        "batch 2",
        "batch 3",
        "epoch_end 1",
        "phase_start 1",
        "epoch_start 2",
        "batch 4",
        "batch 5",
        "batch 6",
        "epoch_end 2",
        "fit_end",
    ]
    assert [row["phase"] for row in loop.history] == [1, 2]
    assert all(row["val_loss"] != row["val_loss"] for row in loop.history)  # NaN: no validation loader
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "plots" / "loss.png").is_file()
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["training_state"]["position"] == {
        "phase": 1,
        "phase_epochs_done": 1,
        "epoch": 2,
        "stopped_early": False,
        "step": 6,
    }


def test_only_callbacks_that_override_the_batch_hook_are_called_per_step(tmp_path):
    recorder = Recorder()
    loop = in_memory_loop(tmp_path, [recorder, LastCheckpoint()])
    assert loop.batch_callbacks == [recorder]


class StopAfter(Callback):
    def __init__(self, epoch: int, phase_only: bool) -> None:
        self.epoch, self.phase_only = epoch, phase_only

    def on_epoch_end(self, loop, metrics):
        if loop.epoch == self.epoch:
            (loop.stop_phase if self.phase_only else loop.stop)(f"asked to at epoch {self.epoch}")


def test_a_callback_stops_training_or_only_the_phase(tmp_path):
    phases = [PhaseConfig(epochs=3, lr=0.01), PhaseConfig(epochs=2, lr=0.01)]
    stopped = in_memory_loop(tmp_path / "a", [StopAfter(2, phase_only=False)], phases)
    stopped.fit()
    assert [row["epoch"] for row in stopped.history] == [1, 2]
    phase_ended = in_memory_loop(tmp_path / "b", [StopAfter(2, phase_only=True)], phases)
    phase_ended.fit()
    assert [(row["epoch"], row["phase"]) for row in phase_ended.history] == [(1, 1), (2, 1), (3, 2), (4, 2)]


class Failing(Callback):
    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def on_epoch_end(self, loop, metrics):
        raise RuntimeError("boom")

    def on_exception(self, loop, error):
        self.seen.append(error)


def test_an_error_reaches_on_exception_and_propagates(tmp_path):
    failing = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        in_memory_loop(tmp_path, [failing]).fit()
    assert [str(e) for e in failing.seen] == ["boom"]


def test_two_callbacks_with_one_state_key_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Recorder"):
        in_memory_loop(tmp_path, [Recorder(), Recorder()])


class StepCounter(Callback):
    """Counts optimisation steps; its count must survive an interruption through last.pt."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, loop, loss):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


class Interrupt(Callback):
    def on_epoch_end(self, loop, metrics):
        if loop.epoch == 1:
            raise KeyboardInterrupt


class InterruptAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, loop, metrics):
        if loop.epoch == self.epoch:
            raise KeyboardInterrupt


def test_a_loop_resumed_from_its_state_dict_restores_callback_state_and_ends_bit_exact(tmp_path):
    """The loop's own resume contract, without ``train()``: a fresh loop given the weights and the
    ``training_state`` that ``LastCheckpoint`` wrote continues the callbacks' state and ends with the
    same weights as an uninterrupted loop (shuffled batches, Adam state and a phase change included)."""
    phases = [PhaseConfig(epochs=2, lr=0.01), PhaseConfig(epochs=2, lr=0.005, optimizer="sgd")]

    def start(run_dir, callbacks):
        torch.manual_seed(0)  # the same initial weights and shuffling stream for every loop
        return in_memory_loop(run_dir, callbacks, phases, model=tiny_net(), shuffle=True)

    uninterrupted_counter = StepCounter()
    uninterrupted = start(tmp_path / "whole", [uninterrupted_counter])
    uninterrupted.fit()

    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 1, mid-phase
        start(tmp_path / "run", [LastCheckpoint(), StepCounter(), InterruptAt(1)]).fit()
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")  # as train(resume=True) reads it
    counter = StepCounter()
    torch.manual_seed(123)  # whatever the global RNG holds now, the resume restores the saved one
    resumed = in_memory_loop(tmp_path / "run", [LastCheckpoint(), counter], phases, model=tiny_net(), shuffle=True)
    resumed.model.load_state_dict(checkpoint["state_dict"])
    resumed.load_state_dict(checkpoint["training_state"])
    assert counter.steps == 3  # restored before fit: one epoch of 3 steps
    resumed.fit()

    assert counter.steps == uninterrupted_counter.steps == 4 * 3
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert [row["loss"] for row in resumed.history] == [row["loss"] for row in uninterrupted.history]
    expected = uninterrupted.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def _config(source, tmp_path):
    return config_from_dict(
        {
            "output_dir": str(tmp_path / "runs"),
            "data": {"source": str(source), "image_size": 16, "channels": 1, "normalize": "sample"},
            "model": {"name": "tiny_loop_net"},
            "training": {
                "batch_size": 8,
                "checkpoint_monitor": "loss",
                "phases": [{"epochs": 3, "lr": 0.01}],
            },
        },
        ["data.split.ratios=[1.0, 0.0, 0.0]"],
    )


def test_callback_state_and_the_ema_continue_through_a_resume(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    with registered_model("tiny_loop_net", tiny_net):
        with pytest.raises(KeyboardInterrupt):
            train(_config(image_folder, tmp_path), run_dir=run_dir, callbacks=[StepCounter(), EMA(0.9), Interrupt()])
        counter, ema = StepCounter(), EMA(0.9)
        train(_config(image_folder, tmp_path), run_dir=run_dir, resume=True, callbacks=[counter, ema])
        steps_per_epoch = 3  # 24 images, batch 8
        assert counter.steps == 3 * steps_per_epoch  # restored from last.pt, then counted on
        assert int(ema.average.n_averaged) == 3 * steps_per_epoch
        averaged = load_predictor(run_dir / "checkpoints" / "ema.pt")  # a checkpoint like any other
        last = load_predictor(run_dir / "checkpoints" / "last.pt")
    ema_weights, last_weights = averaged.torch_model.state_dict(), last.torch_model.state_dict()
    assert any(not torch.equal(ema_weights[k], last_weights[k]) for k in ema_weights)


class WeightTrace(Callback):
    """The head's weights after every step, to recompute the average by hand."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, loop, loss):
        self.weights.append(loop.model.head[2].weight.detach().clone())


def test_ema_is_the_exponential_average_of_the_weights_after_each_step(tmp_path):
    trace, ema = WeightTrace(), EMA(decay=0.8)
    in_memory_loop(tmp_path, [trace, ema]).fit()
    expected = trace.weights[0]  # the first update copies the weights
    for weights in trace.weights[1:]:
        expected = 0.8 * expected + 0.2 * weights
    torch.testing.assert_close(ema.average.module.head[2].weight, expected)
    assert (tmp_path / "checkpoints" / "ema.pt").is_file()
