"""Callbacks: the trainer's extension points, plus the monitors behind early stopping and best checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from covidscan.config import RunConfig

if TYPE_CHECKING:
    from covidscan.training.trainer import TrainResult


class Callback:
    """Subclass and override what you need (MLflow/TensorBoard logging, Optuna pruning, ...).

    Callbacks run on the main process only. An exception raised in ``on_epoch_end`` (e.g.
    ``optuna.TrialPruned``) stops training *after* that epoch's checkpoints are saved and propagates,
    so the run can still be resumed.
    """

    def on_train_start(self, run_dir: Path, config: RunConfig) -> None:
        """Called once the run directory, splits and model exist, before the first epoch."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """Called with the epoch's history row (loss, accuracy, val_loss, ..., lr, seconds)."""

    def on_train_end(self, result: TrainResult) -> None:
        """Called with the final result, after the test evaluation."""


class Monitor:
    """Tracks the best value of one metric; ``min_delta`` is the smallest change that counts."""

    def __init__(self, metric: str, mode: Literal["min", "max"] = "min", min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.min_delta = abs(min_delta)
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch: int | None = None

    def value(self, metrics: dict[str, float]) -> float:
        if self.metric not in metrics:
            raise KeyError(f"monitored metric {self.metric!r} is not logged; available: {sorted(metrics)}")
        return float(metrics[self.metric])

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record ``metrics``; True when the monitored value improved on the best so far."""
        value = self.value(metrics)
        if math.isnan(value):
            return False
        improved = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if improved:
            self.best, self.best_epoch = value, epoch
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class EarlyStopping:
    """Keras-style early stopping: stop after ``patience`` epochs without improvement."""

    def __init__(self, metric: str, patience: int, mode: Literal["min", "max"] = "min", min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.monitor = Monitor(metric, mode, min_delta)
        self.patience = patience
        self.wait = 0

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record an epoch; True when training should stop."""
        if self.monitor.update(epoch, metrics):
            self.wait = 0
        else:
            self.wait += 1
        return self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state["monitor"])
        self.wait = state["wait"]
