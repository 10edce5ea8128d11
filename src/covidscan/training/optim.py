"""Optimizers and learning-rate schedules, one per training phase.

Schedules are plain ``torch.optim.lr_scheduler`` objects so their state round-trips through a
checkpoint. ``exponential`` follows Keras' ``ExponentialDecay`` (study B): it is stepped once per
optimisation step and gives ``lr * decay_rate ** (step / decay_steps)``; ``step`` multiplies by
``gamma`` every ``step_size`` epochs (study C) and is stepped once per epoch; ``cosine`` anneals from
``lr`` to ``min_lr`` over the phase's epochs (stepped per epoch), the usual fine-tuning schedule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, StepLR

from covidscan.config import ConfigError, PhaseConfig, SchedulerConfig


def build_optimizer(phase: PhaseConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The phase's optimizer over ``params`` (the trainable ones)."""
    params = list(params)
    if not params:
        raise ConfigError("no trainable parameters in this phase; check the phase's 'trainable' setting")
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay)
    if phase.optimizer == "rmsprop":
        # Keras' RMSprop defaults (rho 0.9, eps 1e-7), which the studies used, differ from PyTorch's.
        return torch.optim.RMSprop(params, lr=phase.lr, alpha=0.9, eps=1e-7, weight_decay=phase.weight_decay)
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay)
    raise ConfigError(f"unknown optimizer {phase.optimizer!r}")


class ExponentialDecay:
    """Keras ``ExponentialDecay`` (non-staircase) as a ``LambdaLR`` factor of the step count."""

    def __init__(self, decay_steps: int, decay_rate: float) -> None:
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate

    def __call__(self, step: int) -> float:
        return self.decay_rate ** (step / self.decay_steps)


@dataclass
class Schedule:
    """A scheduler and when to step it: after every optimisation step, or after every epoch."""

    scheduler: LRScheduler
    per_step: bool

    def step_batch(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def step_epoch(self) -> None:
        if not self.per_step:
            self.scheduler.step()


def build_schedule(config: SchedulerConfig, optimizer: torch.optim.Optimizer, epochs: int = 1) -> Schedule:
    """The schedule of a phase of ``epochs`` epochs (only ``cosine`` depends on the length)."""
    if config.name == "exponential":
        return Schedule(LambdaLR(optimizer, ExponentialDecay(config.decay_steps, config.decay_rate)), per_step=True)
    if config.name == "step":
        return Schedule(StepLR(optimizer, step_size=config.step_size, gamma=config.gamma), per_step=False)
    if config.name == "cosine":
        return Schedule(CosineAnnealingLR(optimizer, T_max=epochs, eta_min=config.min_lr), per_step=False)
    if config.name == "constant":
        return Schedule(LambdaLR(optimizer, lambda epoch: 1.0), per_step=False)
    raise ConfigError(f"unknown scheduler {config.name!r}")


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
