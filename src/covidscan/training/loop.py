"""The training loop: a model, its loaders, a plan of phases and callbacks (MONAI's ``engines/trainer.py``
takes network and loaders the same way; Lightning's ``Trainer`` calls ``Callback`` hooks the same way).

The loop only trains and validates. What happens around it (checkpoints, early stopping, the
history file, the test evaluation, trackers) are callbacks, and where the data comes from is the
caller's business: :func:`covidscan.training.train` prepares it from a config, a benchmark or a
notebook can hand in any ``DataLoader`` of ``(images, class_indices)``.

Each phase has its own optimizer, schedule and trainable parameters; the model carries over.
Under ``torchrun`` every rank runs the same loop on its shard; metrics are all-reduced, so every
rank sees the same history row.

Hot-loop rule: nothing in a training step waits for the device (no ``.item()``); running sums stay
on the device and are read once per epoch, and ``on_train_batch_end`` is only dispatched to
callbacks that override it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from covidscan.checkpoint import class_probabilities
from covidscan.config import PhaseConfig, RunConfig
from covidscan.data import NormStats
from covidscan.errors import UsageError
from covidscan.models.freezing import set_trainable
from covidscan.progress import progress
from covidscan.training.callbacks import Callback
from covidscan.training.distributed import DistContext, all_gather_objects, all_reduce_sum, barrier
from covidscan.training.loss import ClassificationLoss
from covidscan.training.optim import Schedule, build_optimizer, build_schedule, current_lr

logger = logging.getLogger(__name__)

CallbackT = TypeVar("CallbackT", bound=Callback)


class TrainingLoop:
    """Train ``model`` on ``train_loader`` through ``phases``, validating on ``val_loader`` every epoch.

    ``config``, ``run_dir``, ``class_names`` and ``norm_stats`` describe the run for the callbacks
    (a checkpoint needs them); the loop itself reads only ``config.training`` (AMP, channels-last,
    ``torch.compile``, gradient clipping). ``val_loader=None`` means no validation (``val_*`` NaN).
    ``started`` is the ``time.perf_counter()`` the run's runtime counts from (default: now).
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        *,
        phases: Sequence[PhaseConfig],
        criterion: ClassificationLoss,
        config: RunConfig,
        run_dir: str | Path,
        class_names: Sequence[str],
        norm_stats: NormStats | None = None,
        callbacks: Sequence[Callback] = (),
        device: torch.device | None = None,
        context: DistContext | None = None,
        started: float | None = None,
    ) -> None:
        if not phases:
            raise ValueError("the training plan needs at least one phase")
        self.config = config
        self.context = context or DistContext()
        self.device = device or torch.device("cpu")
        training = config.training
        self.use_amp = training.amp and self.device.type == "cuda"
        self.amp_dtype = torch.float16 if training.amp_dtype == "float16" else torch.bfloat16
        spatial_dims = getattr(model, "spatial_dims", config.data.spatial_dims)
        self.memory_format = (
            (torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
            if training.channels_last and self.device.type == "cuda"
            else torch.contiguous_format
        )
        # torch's type stubs omit Module.to's memory_format argument
        self.model = model.to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]
        # layers opt in to Keras-style L2 terms by defining l2_penalty(); looked up once, not every step
        self.regularized = hasattr(model, "l2_penalty") and any(
            module is not model and hasattr(module, "l2_penalty") for module in model.modules()
        )
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.phases = list(phases)
        self.criterion = criterion.to(self.device)
        self.run_dir = Path(run_dir)
        self.class_names = list(class_names)
        self.norm_stats = norm_stats
        self.callbacks = [c for c in callbacks if self.context.is_main or not c.rank_zero_only]
        keys = [c.state_key for c in self.callbacks]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise UsageError(f"callbacks share the state_key(s) {duplicates}; give each a distinct state_key")
        # the per-step hooks go only to callbacks that override them: none means no cost in the hot loop
        self.batch_callbacks = _overriding(self.callbacks, "on_train_batch_end")
        self.loss_callbacks = _overriding(self.callbacks, "training_loss")
        self.history: list[dict[str, float]] = []
        self.epoch = 0  # global epochs completed (the running one, inside an epoch)
        self.step = 0  # optimisation steps taken over all phases
        self.phase_index = 0
        self.phase_epochs_done = 0
        self.phase_stopped = False  # the current phase was ended early (stays ended on resume)
        self.stop_reason: str | None = None  # training stops after the current epoch
        self.forward_model: nn.Module = self.model  # the model as called in training (DDP, compiled)
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: Schedule | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.started = time.perf_counter() if started is None else started
        self.previous_seconds = 0.0  # runtime of the earlier sessions of a resumed run
        self.resume_state: dict[str, Any] | None = None  # optimizer/scheduler/RNG state waiting for fit()

    # ----------------------------------------------------------------- handle for callbacks
    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0, or the only process)."""
        return self.context.is_main

    @property
    def phase(self) -> PhaseConfig:
        return self.phases[self.phase_index]

    def stop(self, reason: str) -> None:
        """End training after the current epoch (on resume, training continues)."""
        self.stop_reason = reason

    def stop_phase(self, reason: str) -> None:
        """End the current phase after this epoch; the next phase starts (early stopping)."""
        self.phase_stopped = True
        if self.is_main:
            logger.info("%s", reason)

    def callback(self, kind: type[CallbackT]) -> CallbackT | None:
        """The first callback of type ``kind`` (e.g. ``TestEvaluation``), or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def elapsed(self) -> float:
        """Seconds this run has taken so far, earlier sessions of a resumed run included."""
        return self.previous_seconds + time.perf_counter() - self.started

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs besides the weights: position, optimizer, scheduler, scaler,
        history, RNG states, runtime and every callback's state."""
        return {
            "position": {
                "phase": self.phase_index,
                "phase_epochs_done": self.phase_epochs_done,
                "epoch": self.epoch,
                "stopped_early": self.phase_stopped,
                "step": self.step,
            },
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.schedule.scheduler.state_dict() if self.schedule is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": list(self.history),
            "rng": _rng_state(),
            "seconds": self.elapsed(),
            "callbacks": {c.state_key: c.state_dict() for c in self.callbacks},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()``: callbacks are restored now, the optimizer, scheduler and
        RNG states when :meth:`fit` rebuilds the phase they belong to."""
        position = state["position"]
        self.phase_index = position["phase"]
        self.phase_epochs_done = position["phase_epochs_done"]
        self.epoch = position["epoch"]
        self.phase_stopped = position["stopped_early"]
        self.step = position.get("step", 0)
        self.history = list(state["history"])
        self.previous_seconds = state["seconds"]
        callback_states = state["callbacks"]
        for callback in self.callbacks:
            if callback.state_key in callback_states:
                callback.load_state_dict(callback_states[callback.state_key])
        self.resume_state = state

    # ----------------------------------------------------------------- training
    def fit(self) -> None:
        """Run the remaining phases; ``on_exception`` then re-raise if anything fails."""
        try:
            self._dispatch("on_fit_start")
            self._run_phases()
            barrier(self.context)
            self._dispatch("on_fit_end")  # rank 0 may evaluate the test split meanwhile
            barrier(self.context)
        except BaseException as error:
            for callback in self.callbacks:
                try:
                    callback.on_exception(self, error)
                except Exception:  # a failing clean-up must not hide the error that stopped training
                    logger.exception("%s.on_exception failed", type(callback).__name__)
            raise

    def _dispatch(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _run_phases(self) -> None:
        resume, self.resume_state = self.resume_state, None
        if resume is not None:
            _set_rng_state(resume["rng"])
            if (
                self.phase_index >= len(self.phases)
                or self.phase_stopped
                or self.phase_epochs_done >= self.phase.epochs
            ):
                # that phase is complete (possibly extended by a --set on resume): on to the next
                resume = None
                self.phase_index += 1
                self.phase_epochs_done, self.phase_stopped = 0, False
        while self.phase_index < len(self.phases) and self.stop_reason is None:
            self._start_phase(resume)
            resume = None
            while self.phase_epochs_done < self.phase.epochs and not self.phase_stopped and self.stop_reason is None:
                self._run_epoch()
            if self.stop_reason is None and self.phase_index + 1 < len(self.phases):
                self.phase_index += 1
                self.phase_epochs_done, self.phase_stopped = 0, False
            else:
                break
        if self.stop_reason is not None and self.is_main:
            logger.info("training stopped after epoch %d: %s", self.epoch, self.stop_reason)

    def _start_phase(self, resume: dict[str, Any] | None) -> None:
        phase = self.phase
        trainable = set_trainable(self.model, phase.trainable)
        if self.is_main:
            logger.info(
                "phase %d/%d: %s lr %g, trainable %s (%d parameters)",
                self.phase_index + 1,
                len(self.phases),
                phase.optimizer,
                phase.lr,
                phase.trainable,
                trainable,
            )
        forward_model: nn.Module = self.model
        if self.context.enabled:  # re-wrapped per phase: DDP fixes the trainable set at construction
            from torch.nn.parallel import DistributedDataParallel

            forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.config.training.compile:
            forward_model = cast(nn.Module, torch.compile(forward_model))
        self.forward_model = forward_model
        self.optimizer = build_optimizer(phase, (p for p in self.model.parameters() if p.requires_grad))
        self.schedule = build_schedule(phase.scheduler, self.optimizer, phase.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.schedule.scheduler.load_state_dict(resume["scheduler"])
            self.scaler.load_state_dict(resume["scaler"])
        self._dispatch("on_phase_start")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _penalty(self) -> torch.Tensor | float:
        """Keras-style kernel regularisation terms the model declares (study E's L2 head)."""
        return self.model.l2_penalty() if self.regularized else 0.0

    def _run_epoch(self) -> None:
        self.epoch += 1
        start = time.perf_counter()
        self._dispatch("on_epoch_start")
        sampler: Any = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: one global shuffling order per epoch
            sampler.set_epoch(self.epoch)
        self.model.train()
        model, optimizer, schedule, scaler = self.forward_model, self.optimizer, self.schedule, self.scaler
        if optimizer is None or schedule is None or scaler is None:
            raise RuntimeError("an epoch ran before its phase was started")
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.config.training.grad_clip
        batch_callbacks = self.batch_callbacks
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        count = 0
        total = sum(p.epochs for p in self.phases)
        batches = progress(
            self.train_loader, desc=f"epoch {self.epoch}/{total}", unit="batch", disable=not self.is_main
        )
        for images, targets in batches:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = model(images)
                terms = [term for c in self.loss_callbacks if (term := c.training_loss(self, images)) is not None]
            loss = self.criterion(logits, targets) + self._penalty() + sum(terms)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step_batch()
            self.step += 1
            batch_loss = loss.detach()
            loss_sum += batch_loss.double() * len(targets)
            correct += (logits.detach().argmax(dim=1) == targets).sum()
            count += len(targets)
            for callback in batch_callbacks:
                callback.on_train_batch_end(self, batch_loss)
        lr = current_lr(optimizer)
        schedule.step_epoch()
        sums = all_reduce_sum(
            torch.stack([loss_sum, correct.double(), torch.tensor(count, device=self.device, dtype=torch.float64)]),
            self.context,
        ).tolist()
        row = {
            "epoch": self.epoch,
            "phase": self.phase_index + 1,
            "loss": sums[0] / max(sums[2], 1),
            "accuracy": sums[1] / max(sums[2], 1),
            **self.validate(),
            **{key: value for c in self.callbacks for key, value in c.epoch_metrics(self).items()},
            "lr": lr,
        }
        row["seconds"] = time.perf_counter() - start
        if self.is_main:
            logger.info(
                "epoch %d: %s",
                self.epoch,
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "phase")),
            )
        self.history.append(row)
        self.phase_epochs_done += 1
        self._dispatch("on_epoch_end", dict(row))

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        """Validation loss/accuracy/AUC over the whole val split (shards gathered across ranks)."""
        if self.val_loader is None:
            return {"val_loss": math.nan, "val_accuracy": math.nan, "val_auc": math.nan}
        self.model.eval()
        losses, probabilities, labels = [], [], []
        for images, targets in self.val_loader:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(images)
            losses.append(self.criterion.per_sample(logits, targets))
            probabilities.append(class_probabilities(logits, self.criterion.head))
            labels.append(targets)
        local = (
            (torch.cat(losses).cpu().numpy(), torch.cat(probabilities).cpu().numpy(), torch.cat(labels).cpu().numpy())
            if labels
            else None
        )
        shards = [shard for shard in all_gather_objects(local, self.context) if shard is not None]
        if not shards:
            return {"val_loss": math.nan, "val_accuracy": math.nan, "val_auc": math.nan}
        loss, probs, y = (np.concatenate(parts) for parts in zip(*shards))
        penalty = float(self._penalty())
        return {
            "val_loss": float(loss.mean()) + penalty,
            "val_accuracy": float((probs.argmax(1) == y).mean()),
            "val_auc": roc_auc(y, probs),
        }


def _overriding(callbacks: Sequence[Callback], hook: str) -> list[Callback]:
    """The callbacks whose class overrides ``hook`` (the others would only cost time in the hot loop)."""
    return [c for c in callbacks if getattr(type(c), hook) is not getattr(Callback, hook)]


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary AUC of class 1, or macro one-vs-rest AUC; NaN when a class is missing from ``labels``."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < probabilities.shape[1]:
        return math.nan
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
