"""Callbacks: everything the training loop does besides training, each with its own resumable state.

A :class:`Callback` overrides the hooks it needs; every hook gets the :class:`~covidscan.training.loop.TrainingLoop`
(model, optimizer, epoch, history, run_dir, config, ...). Best/last checkpoints, early stopping and
the history file are callbacks like any other (Lightning's ``Callback`` + ``ModelCheckpoint`` +
``EarlyStopping``), so a new behaviour (EMA weights, LR warm-up, another checkpoint rule) is a new
callback, not an edit of the loop. ``state_dict()`` / ``load_state_dict()`` carry a callback's state
through ``checkpoints/last.pt``, so a resumed run continues every callback where it stopped.

The run-level reporting callbacks (test-split evaluation, ``metrics.json``) are in
:mod:`covidscan.training.reporting`, the one training module that depends on ``covidscan.evaluation``.
"""

from __future__ import annotations

import logging
import math
import shutil
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from covidscan.checkpoint import BEST_NAME, LAST_NAME, save_checkpoint
from covidscan.errors import UsageError
from covidscan.training.history import plot_history, write_history

if TYPE_CHECKING:
    from covidscan.training.loop import TrainingLoop

logger = logging.getLogger(__name__)


class Callback:
    """Subclass and override the hooks you need; each receives the loop.

    Order of calls: ``on_fit_start`` once; per phase ``on_phase_start`` (also for the phase a resumed
    run continues); per epoch ``on_epoch_start``, ``training_loss`` after every forward pass,
    ``on_train_batch_end`` after every optimisation step, ``epoch_metrics`` for the history row,
    ``on_epoch_end`` with that row; ``on_fit_end`` once after the last epoch; ``on_exception``
    instead when training raises (then the error propagates).

    To stop, call ``loop.stop(reason)`` (training ends after this epoch; a resume would continue) or
    ``loop.stop_phase(reason)`` (the phase ends, as early stopping does, and stays ended on resume).
    An exception raised in ``on_epoch_end`` (``KeyboardInterrupt``, ``optuna.TrialPruned``) also stops
    training; that epoch's checkpoints are already saved, so the run can be resumed.

    Callbacks run on the main process only (rank 0 under ``torchrun``), in the order given, after the
    built-in ones. A callback that must act on every rank (a stopping rule every process has to
    follow) sets ``rank_zero_only = False``; it then writes files only when ``loop.is_main``.
    """

    rank_zero_only: ClassVar[bool] = True

    @property
    def state_key(self) -> str:
        """The name this callback's state is saved under in ``last.pt``; unique among a loop's callbacks."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        """What must survive an interruption (saved in ``last.pt`` after every epoch)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called before ``on_fit_start`` on resume)."""

    def on_fit_start(self, loop: TrainingLoop) -> None:
        """Once, before the first epoch (the run directory, splits and model exist)."""

    def on_phase_start(self, loop: TrainingLoop) -> None:
        """When a phase's optimizer and schedule are ready; ``loop.phase_epochs_done`` > 0 when resumed mid-phase."""

    def on_epoch_start(self, loop: TrainingLoop) -> None:
        """Before each training epoch; ``loop.epoch`` is the epoch about to run (from 1)."""

    def on_train_batch_end(self, loop: TrainingLoop, loss: Any) -> None:
        """After each optimisation step, with the batch loss as a device tensor.

        Keep it cheap: it runs in the hot loop. Never read ``loss.item()`` here (it waits for the
        device); the loop calls this hook only on callbacks that override it.
        """

    def training_loss(self, loop: TrainingLoop, images: torch.Tensor) -> torch.Tensor | None:
        """A term to add to the loss of the batch ``images`` the model has just seen (an auxiliary
        objective such as domain-adversarial training), or None.

        Called in the hot loop, inside the step's autocast context, only on callbacks that override
        it; parameters it trains outside the model are the callback's to step (``on_train_batch_end``).
        """
        return None

    def epoch_metrics(self, loop: TrainingLoop) -> dict[str, float]:
        """Extra columns for the epoch's history row (read once per epoch, before ``on_epoch_end``)."""
        return {}

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        """After each epoch, with its history row (loss, accuracy, val_loss, ..., lr, seconds)."""

    def on_fit_end(self, loop: TrainingLoop) -> None:
        """Once after the last epoch (after the test evaluation for callbacks added to ``train``)."""

    def on_exception(self, loop: TrainingLoop, error: BaseException) -> None:
        """When training raises (including ``KeyboardInterrupt``), before the error propagates."""


class Monitor:
    """Tracks the best value of one metric; ``min_delta`` is the smallest change that counts."""

    def __init__(self, metric: str, mode: Literal["min", "max"] = "min", min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise UsageError(f"mode must be 'min' or 'max', got {mode!r}")
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

    def reset(self) -> None:
        self.best, self.best_epoch = (math.inf if self.mode == "min" else -math.inf), None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class EarlyStopping(Callback):
    """Keras-style early stopping within each phase: after ``patience`` epochs without improvement
    the phase ends (as one Keras ``fit()`` per phase would) and the next phase starts.

    Runs on every rank: all processes see the same (all-reduced) metrics, so they stop together.
    """

    rank_zero_only = False

    def __init__(self, metric: str, patience: int, mode: Literal["min", "max"] = "min", min_delta: float = 0.0) -> None:
        if patience < 1:
            raise UsageError(f"patience must be >= 1, got {patience}")
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

    def on_phase_start(self, loop: TrainingLoop) -> None:
        if loop.phase_epochs_done == 0:  # a fresh phase; a resumed one keeps its restored state
            self.monitor.reset()
            self.wait = 0

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        if self.update(loop.epoch, metrics):
            loop.stop_phase(
                f"early stopping in phase {loop.phase_index + 1} after epoch {loop.epoch} "
                f"({self.monitor.metric} did not improve for {self.patience} epochs)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state["monitor"])
        self.wait = state["wait"]


class BestCheckpoint(Callback):
    """``checkpoints/best.pt`` whenever ``metric`` improves, tracked across all phases.

    Runs on every rank so each knows the best epoch; only rank 0 writes.
    """

    rank_zero_only = False

    def __init__(self, metric: str, mode: Literal["min", "max"] = "min") -> None:
        self.monitor = Monitor(metric, mode)

    @property
    def best_epoch(self) -> int | None:
        return self.monitor.best_epoch

    def best_row(self, history: list[dict[str, float]]) -> dict[str, float]:
        """The history row of the best epoch ({} before any improvement)."""
        return next((row for row in history if row["epoch"] == self.best_epoch), {})

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        if self.monitor.update(loop.epoch, metrics) and loop.is_main:
            save_model_checkpoint(loop, BEST_NAME, metrics)

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)


class LastCheckpoint(Callback):
    """``checkpoints/last.pt`` after every epoch: the weights plus ``loop.state_dict()`` (position,
    optimizer, scheduler, scaler, history, RNG and every callback's state), all a resume needs.

    Put it after the callbacks whose epoch-end state it must capture (``train`` puts it after the
    built-in ones and before yours, so a callback raising in ``on_epoch_end`` finds the epoch saved).
    """

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        save_model_checkpoint(loop, LAST_NAME, metrics, training_state=loop.state_dict())


class HistoryWriter(Callback):
    """``history.csv`` (rewritten atomically every epoch) and the accuracy/loss plots at the end,
    also when training stops with an error, so an interrupted run still has its curves."""

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        write_history(loop.run_dir / "history.csv", loop.history)

    def on_fit_end(self, loop: TrainingLoop) -> None:
        self._plot(loop)

    def on_exception(self, loop: TrainingLoop, error: BaseException) -> None:
        self._plot(loop)

    @staticmethod
    def _plot(loop: TrainingLoop) -> None:
        if loop.history:
            plot_history(loop.history, loop.run_dir / "plots")


class EMA(Callback):
    """An exponential moving average of the weights, updated after every optimisation step and
    saved as ``checkpoints/ema.pt`` (a full checkpoint: ``covidscan evaluate --checkpoint
    RUN/checkpoints/ema.pt``) when training ends; often a smoother, better model than the last weights.

    PyTorch's own EMA (``AveragedModel`` with ``get_ema_multi_avg_fn``), BatchNorm statistics
    included. The average is part of ``last.pt``, so a resumed run continues it.
    """

    def __init__(self, decay: float = 0.999, name: str = "ema.pt") -> None:
        if not 0.0 < decay < 1.0:
            raise UsageError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.name = name
        self.average: AveragedModel | None = None
        self.restored: dict[str, Any] | None = None  # a resumed average, applied once the model exists

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self.average = AveragedModel(loop.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        if self.restored is not None:
            self.average.load_state_dict(self.restored)

    def on_train_batch_end(self, loop: TrainingLoop, loss: Any) -> None:
        if self.average is not None:
            self.average.update_parameters(loop.model)

    def on_fit_end(self, loop: TrainingLoop) -> None:
        if self.average is not None and int(self.average.n_averaged):
            save_model_checkpoint(loop, self.name, loop.history[-1] if loop.history else {}, model=self.average.module)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.state_dict() if self.average is not None else self.restored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = state["average"]


class PhaseCheckpoints(Callback):
    """``checkpoints/phase-N.pt``: a copy of ``best.pt`` as it stood when phase N ended, so a
    two-phase run (study E: head only, then fine-tuned) can report the model of each phase.

    Stateless: the copy is made when the next phase starts fresh, before its first epoch can replace
    ``best.pt``; a resumed run finds the files of its finished phases in place. The last phase needs
    no copy: its model is ``best.pt`` itself.
    """

    def on_phase_start(self, loop: TrainingLoop) -> None:
        if loop.phase_index == 0 or loop.phase_epochs_done > 0:
            return
        best = loop.run_dir / "checkpoints" / BEST_NAME
        if not best.is_file():
            logger.warning(
                "phase %d ended without a best checkpoint; no %s",
                loop.phase_index,
                phase_checkpoint_name(loop.phase_index),
            )
            return
        shutil.copyfile(best, loop.run_dir / "checkpoints" / phase_checkpoint_name(loop.phase_index))


def phase_checkpoint_name(phase: int) -> str:
    """The file :class:`PhaseCheckpoints` writes for phase ``phase`` (counted from 1)."""
    return f"phase-{phase}.pt"


def save_model_checkpoint(
    loop: TrainingLoop,
    name: str,
    metrics: dict[str, float],
    training_state: dict[str, Any] | None = None,
    model: nn.Module | None = None,
) -> None:
    """Write ``<run_dir>/checkpoints/<name>`` with what every consumer of a checkpoint needs
    (``model``: other weights than the loop's, e.g. an average)."""
    save_checkpoint(
        loop.run_dir / "checkpoints" / name,
        model=model if model is not None else loop.model,
        config=loop.config,
        class_names=list(loop.class_names),
        norm_stats=loop.norm_stats,
        epoch=loop.epoch,
        metrics=metrics,
        training_state=training_state,
    )
