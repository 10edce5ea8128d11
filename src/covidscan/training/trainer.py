"""The one trainer: every model, study and launch mode (single process or ``torchrun`` DDP).

``train(config)`` turns a :class:`~covidscan.config.RunConfig` into a run directory: splits and label
map, per-epoch history and plots, ``checkpoints/best.pt`` + ``checkpoints/last.pt``, the test
evaluation of the best checkpoint and ``metrics.json``. ``last.pt`` carries the optimizer,
scheduler, early-stopping, history and RNG state, so ``train(config, run_dir, resume=True)``
continues an interrupted run where it stopped.

Hot-loop rule: nothing in a training step waits for the device (no ``.item()``); running sums stay
on the device and are read once per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from covidscan.checkpoint import BEST_NAME, LAST_NAME, class_probabilities, load_checkpoint, save_checkpoint
from covidscan.config import ConfigError, PhaseConfig, RunConfig, SplitConfig
from covidscan.data import DataError, NormStats, SampleSet, build_dataset, fit_norm_stats, load_samples, read_image
from covidscan.progress import progress
from covidscan.runtime import create_run_dir, resolve_device, seed_everything, write_json
from covidscan.training.callbacks import Callback, EarlyStopping, Monitor
from covidscan.training.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    device_for,
    env_context,
    init_distributed,
    shutdown,
)
from covidscan.training.history import plot_history, write_history
from covidscan.training.optim import Schedule, build_optimizer, build_schedule, current_lr

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_metrics: dict[str, float]  # the history row of the best epoch (checkpoint_monitor)
    history: list[dict[str, float]]
    test_metrics: dict[str, Any] | None  # evaluate_run's result on the test split; None without one


def train(
    config: RunConfig, run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (), resume: bool = False
) -> TrainResult:
    """Train ``config`` into ``run_dir`` (a new timestamped directory when None).

    With ``resume=True``, ``run_dir`` is an interrupted run: its ``checkpoints/last.pt`` and
    ``splits.csv`` are reloaded and training continues after the last completed epoch.
    Under ``torchrun`` every rank calls this; only rank 0 writes files and runs callbacks.
    """
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run directory of the interrupted run")
    context = env_context()
    device = device_for(context, resolve_device(config.training.device))
    created = init_distributed(context, device)
    try:
        return _Trainer(config, context, device, list(callbacks)).run(run_dir, resume)
    finally:
        shutdown(created)


class ClassificationLoss(nn.Module):
    """Softmax + cross-entropy or sigmoid + binary cross-entropy on one-hot targets.

    Class weights scale each sample's loss and the batch mean divides by the batch size, as Keras'
    ``class_weight`` does (PyTorch's ``weight=`` would divide by the summed weights instead).
    """

    def __init__(self, head: str, num_classes: int, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.head = head
        self.num_classes = num_classes
        self.register_buffer("class_weights", class_weights, persistent=False)

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.head == "sigmoid":
            one_hot = F.one_hot(targets, self.num_classes).to(logits.dtype)
            return F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").mean(dim=1)
        return F.cross_entropy(logits, targets, reduction="none")

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self.per_sample(logits, targets)
        if self.class_weights is not None:
            losses = losses * self.class_weights[targets]
        return losses.mean()


def balanced_class_weights(labels: Sequence[int], class_names: Sequence[str]) -> torch.Tensor:
    """scikit-learn's ``balanced`` weights: n_samples / (n_classes * count(class))."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels)
    missing = [name for i, name in enumerate(class_names) if not np.any(labels == i)]
    if missing:
        raise DataError(
            f"class(es) {missing} have no training samples, so balanced class weights are undefined; "
            "add samples, change the split, or set training.class_weights: none"
        )
    weights = compute_class_weight("balanced", classes=np.arange(len(class_names)), y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary AUC of class 1, or macro one-vs-rest AUC; NaN when a class is missing from ``labels``."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < probabilities.shape[1]:
        return math.nan
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def _seed_worker(worker_id: int) -> None:
    """Workers get distinct, reproducible NumPy/random streams derived from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


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


@dataclass
class _Position:
    """Where training continues: phase index and the number of epochs already done in it."""

    phase: int = 0
    phase_epochs_done: int = 0
    epoch: int = 0  # global epochs completed
    stopped_early: bool = False  # the phase ended by early stopping


class _Trainer:
    def __init__(
        self, config: RunConfig, context: DistContext, device: torch.device, callbacks: list[Callback]
    ) -> None:
        self.config = config
        self.context = context
        self.device = device
        self.callbacks = callbacks if context.is_main else []
        training = config.training
        self.use_amp = training.amp and device.type == "cuda"
        self.amp_dtype = torch.float16 if training.amp_dtype == "float16" else torch.bfloat16
        self.memory_format = (
            (torch.channels_last if config.data.spatial_dims == 2 else torch.channels_last_3d)
            if training.channels_last and device.type == "cuda"
            else torch.contiguous_format
        )
        if training.batch_size % context.world_size:
            raise ConfigError(
                f"training.batch_size {training.batch_size} is the global batch and must be divisible "
                f"by the number of processes ({context.world_size})"
            )
        self.batch_size = training.batch_size // context.world_size

    # ----------------------------------------------------------------- setup
    def run(self, run_dir: str | Path | None, resume: bool) -> TrainResult:
        config, ctx = self.config, self.context
        started = time.perf_counter()
        seed_everything(config.seed, config.training.deterministic)
        checkpoint = None
        if resume:
            checkpoint = load_checkpoint(Path(run_dir) / "checkpoints" / LAST_NAME)
            if not checkpoint.get("training_state"):
                raise ValueError(f"{checkpoint['path']}: no training state to resume from")
        run_dir = Path(broadcast_object(str(create_run_dir(config, run_dir)) if ctx.is_main else None, ctx))
        self.run_dir = run_dir

        splits = self._prepare_splits(resume)
        self.class_names = splits.class_names
        stats = self._norm_stats(splits, checkpoint)
        self.norm_stats = stats
        train_set = build_dataset(
            config.data, splits.subset("train").samples, self.class_names, train=True, stats=stats
        )
        val_set = build_dataset(config.data, splits.subset("val").samples, self.class_names, train=False, stats=stats)
        self.has_val = len(val_set) > 0
        self.test_size = len(splits.subset("test").samples)
        self._check_monitors(self.has_val)
        self.train_loader = self._train_loader(train_set)
        self.val_loader = self._eval_loader(val_set)

        self.model = self._build_model()
        weights = None
        if config.training.class_weights == "balanced":
            weights = balanced_class_weights(splits.subset("train").labels(), self.class_names)
            logger.info("balanced class weights: %s", dict(zip(self.class_names, weights.tolist())))
        self.criterion = ClassificationLoss(config.model.head, len(self.class_names), weights).to(self.device)
        self.val_criterion = ClassificationLoss(config.model.head, len(self.class_names)).to(self.device)
        self.best = Monitor(config.training.checkpoint_monitor, config.training.checkpoint_mode)
        self.history: list[dict[str, float]] = []
        position, state = _Position(), None
        previous_seconds = 0.0
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["state_dict"])
            state = checkpoint["training_state"]
            position = _Position(**state["position"])
            self.best.load_state_dict(state["best"])
            self.history = list(state["history"])
            previous_seconds = state["seconds"]
            logger.info("resuming %s after epoch %d", run_dir, position.epoch)
        torch.manual_seed(config.seed + ctx.rank)  # distinct augmentation streams per rank

        for callback in self.callbacks:
            callback.on_train_start(run_dir, config)
        self.started, self.previous_seconds = started, previous_seconds
        try:
            self._train_phases(position, state)
        finally:
            if ctx.is_main and self.history:
                plot_history(self.history, run_dir / "plots")
        return self._finish(train_set)

    def _prepare_splits(self, resume: bool) -> SampleSet:
        """Load, split (or reload the run's split on resume), save splits + label map, check leakage."""
        from covidscan.data.audit import check_split_leakage
        from covidscan.data.splits import assign_splits, save_splits

        data = self.config.data
        samples = load_samples(
            data.source,
            classes=data.classes,
            label_map=data.label_map,
            skip_bad=data.skip_bad,
            max_per_class=data.max_per_class,
        )
        split_config = SplitConfig(method="file", file=str(self.run_dir / "splits.csv")) if resume else data.split
        splits = assign_splits(samples, split_config, self.config.seed)
        if data.test_source:
            external = load_samples(
                data.test_source, classes=splits.class_names, label_map=data.label_map, skip_bad=data.skip_bad
            )
            splits = SampleSet(
                splits.samples + [s.with_split("test") for s in external.samples],
                splits.class_names,
                splits.skipped + external.skipped,
            )
        refusal = None
        if self.context.is_main:
            save_splits(splits, self.run_dir / "splits.csv")
            write_json(self.run_dir / "label_map.json", splits.label_map)
            if splits.skipped:
                write_json(self.run_dir / "skipped.json", [{"path": p, "reason": r} for p, r in splits.skipped])
            try:
                check_split_leakage(
                    splits, strict=self.config.training.strict_leakage, report_path=self.run_dir / "leakage.json"
                )
            except DataError as exc:
                refusal = str(exc)
        refusal = broadcast_object(refusal, self.context)  # every rank stops, none waits forever
        if refusal:
            raise DataError(refusal)
        return splits

    def _norm_stats(self, splits: SampleSet, checkpoint: dict[str, Any] | None) -> NormStats | None:
        data = self.config.data
        if data.normalize != "dataset":
            return None
        if checkpoint is not None and checkpoint.get("norm_stats"):
            return NormStats(**checkpoint["norm_stats"])
        if data.spatial_dims == 3:
            raise ConfigError(
                "data.normalize 'dataset' is fitted on 2D training images; for 3D volumes use 'sample' or 'none'"
            )
        train_paths = [s.path for s in splits.subset("train").samples]
        return fit_norm_stats((read_image(path, data.window) for path in train_paths), data.image_size)

    def _check_monitors(self, has_val: bool) -> None:
        training = self.config.training
        monitors = {"training.checkpoint_monitor": training.checkpoint_monitor}
        if training.early_stopping is not None:
            monitors["training.early_stopping.monitor"] = training.early_stopping.monitor
        allowed = ("loss", "accuracy", "val_loss", "val_accuracy", "val_auc")
        for key, metric in monitors.items():
            if metric not in allowed:
                raise ConfigError(f"{key}: unknown metric {metric!r}; choose one of {list(allowed)}")
            if metric.startswith("val_") and not has_val:
                raise ConfigError(
                    f"{key} is {metric!r} but the split has no validation part; give "
                    "data.split.ratios a val share or monitor 'loss'"
                )

    def _train_loader(self, dataset: Dataset) -> DataLoader:
        """DistributedSampler even for one process: one global shuffling order (seed + epoch), so a run
        with N processes sees the same global batches as a single process."""
        ctx = self.context
        self.sampler = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=self.config.seed
        )
        per_rank = len(self.sampler)
        # a final batch of one sample breaks BatchNorm in training mode; drop it (Keras would not)
        drop_last = per_rank % self.batch_size == 1 and per_rank > 1
        if drop_last:
            logger.warning("dropping the last training batch of each epoch: it would hold a single sample")
        return self._loader(dataset, sampler=self.sampler, drop_last=drop_last)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """Rank r evaluates items r, r+N, ...: no padding, so gathered metrics are exact."""
        ctx = self.context
        shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size)) if ctx.enabled else dataset
        return self._loader(shard, sampler=None, drop_last=False)

    def _loader(self, dataset: Dataset, *, sampler: Any, drop_last: bool) -> DataLoader:
        workers = self.config.data.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            persistent_workers=workers > 0,
            worker_init_fn=_seed_worker if workers else None,
            prefetch_factor=self.config.data.prefetch_factor if workers else None,
        )

    def _build_model(self) -> nn.Module:
        from covidscan.models import create_model

        cfg = self.config
        model = create_model(
            cfg.model.name,
            num_classes=len(self.class_names),
            in_channels=cfg.data.channels,
            pretrained=cfg.model.pretrained,
            weights=cfg.model.weights,
            **cfg.model.kwargs,
        )
        self.parameter_count = sum(p.numel() for p in model.parameters())
        # layers opt in to Keras-style L2 terms by defining l2_penalty(); looked up once, not every step
        self.regularized = hasattr(model, "l2_penalty") and any(
            module is not model and hasattr(module, "l2_penalty") for module in model.modules()
        )
        return model.to(self.device, memory_format=self.memory_format)

    # ----------------------------------------------------------------- training
    def _train_phases(self, start: _Position, state: dict[str, Any] | None) -> None:
        phases = self.config.training.phases
        epoch = start.epoch
        if state is not None:
            _set_rng_state(state["rng"])
            continuing = (
                not start.stopped_early
                and start.phase < len(phases)
                and start.phase_epochs_done < phases[start.phase].epochs
            )
            if not continuing:  # that phase is complete (possibly extended by a --set on resume)
                start, state = _Position(start.phase + 1, 0, epoch), None
        for phase_index in range(start.phase, len(phases)):
            phase = phases[phase_index]
            resumed = state is not None and phase_index == start.phase
            forward_model, optimizer, schedule, scaler, stopper = self._start_phase(phase_index, phase)
            first = 1
            if resumed:
                optimizer.load_state_dict(state["optimizer"])
                schedule.scheduler.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
                if stopper is not None and state["early_stopping"] is not None:
                    stopper.load_state_dict(state["early_stopping"])
                first = start.phase_epochs_done + 1
            for phase_epoch in range(first, phase.epochs + 1):
                epoch += 1
                row = self._run_epoch(epoch, phase_index, phase, forward_model, optimizer, schedule, scaler)
                stop = stopper.update(epoch, row) if stopper is not None else False
                if stop:
                    logger.info(
                        "early stopping in phase %d after epoch %d (%s did not improve for %d epochs)",
                        phase_index + 1,
                        epoch,
                        stopper.monitor.metric,
                        stopper.patience,
                    )
                position = _Position(phase_index, phase_epoch, epoch, stop)
                self._end_epoch(row, position, optimizer, schedule, scaler, stopper)
                if stop:
                    break

    def _start_phase(self, index: int, phase: PhaseConfig):
        from covidscan.models.freezing import set_trainable

        trainable = set_trainable(self.model, phase.trainable)
        logger.info(
            "phase %d/%d: %s lr %g, trainable %s (%d parameters)",
            index + 1,
            len(self.config.training.phases),
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
            forward_model = torch.compile(forward_model)
        optimizer = build_optimizer(phase, (p for p in self.model.parameters() if p.requires_grad))
        schedule = build_schedule(phase.scheduler, optimizer)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        es = self.config.training.early_stopping
        stopper = EarlyStopping(es.monitor, es.patience, es.mode, es.min_delta) if es is not None else None
        return forward_model, optimizer, schedule, scaler, stopper

    def _autocast(self):
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _penalty(self) -> torch.Tensor | float:
        """Keras-style kernel regularisation terms the model declares (study E's L2 head)."""
        return self.model.l2_penalty() if self.regularized else 0.0

    def _run_epoch(
        self,
        epoch: int,
        phase_index: int,
        phase: PhaseConfig,
        forward_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        scaler: torch.amp.GradScaler,
    ) -> dict:
        start = time.perf_counter()
        self.sampler.set_epoch(epoch)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.config.training.grad_clip
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        count = 0
        total = sum(p.epochs for p in self.config.training.phases)
        bar = progress(self.train_loader, desc=f"epoch {epoch}/{total}", unit="batch", disable=not self.context.is_main)
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = forward_model(images)
            loss = self.criterion(logits, targets) + self._penalty()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step_batch()
            loss_sum += loss.detach().double() * len(targets)
            correct += (logits.detach().argmax(dim=1) == targets).sum()
            count += len(targets)
        bar.close()
        lr = current_lr(optimizer)
        schedule.step_epoch()
        sums = all_reduce_sum(
            torch.stack([loss_sum, correct.double(), torch.tensor(count, device=self.device, dtype=torch.float64)]),
            self.context,
        ).tolist()
        row = {
            "epoch": epoch,
            "phase": phase_index + 1,
            "loss": sums[0] / max(sums[2], 1),
            "accuracy": sums[1] / max(sums[2], 1),
            **self._validate(),
            "lr": lr,
        }
        row["seconds"] = time.perf_counter() - start
        if self.context.is_main:
            logger.info(
                "epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "phase"))
            )
        return row

    @torch.inference_mode()
    def _validate(self) -> dict[str, float]:
        """Validation loss/accuracy/AUC over the whole val split (shards gathered across ranks)."""
        if not self.has_val:
            return {"val_loss": math.nan, "val_accuracy": math.nan, "val_auc": math.nan}
        self.model.eval()
        losses, probabilities, labels = [], [], []
        for images, targets in self.val_loader:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(images)
            losses.append(self.val_criterion.per_sample(logits, targets))
            probabilities.append(class_probabilities(logits, self.config.model.head))
            labels.append(targets)
        local = (
            (torch.cat(losses).cpu().numpy(), torch.cat(probabilities).cpu().numpy(), torch.cat(labels).cpu().numpy())
            if labels
            else None
        )
        shards = [shard for shard in all_gather_objects(local, self.context) if shard is not None]
        loss, probs, y = (np.concatenate(parts) for parts in zip(*shards))
        penalty = float(self._penalty())
        return {
            "val_loss": float(loss.mean()) + penalty,
            "val_accuracy": float((probs.argmax(1) == y).mean()),
            "val_auc": roc_auc(y, probs),
        }

    def _end_epoch(
        self,
        row: dict[str, float],
        position: _Position,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        scaler: torch.amp.GradScaler,
        stopper: EarlyStopping | None,
    ) -> None:
        """History, best and last checkpoints (rank 0), then callbacks; a callback may raise to stop."""
        self.history.append(row)
        improved = self.best.update(row["epoch"], row)
        if self.context.is_main:
            write_history(self.run_dir / "history.csv", self.history)
            common = dict(
                model=self.model,
                config=self.config,
                class_names=self.class_names,
                norm_stats=self.norm_stats,
                epoch=int(row["epoch"]),
                metrics=row,
            )
            if improved:
                save_checkpoint(self.run_dir / "checkpoints" / BEST_NAME, **common)
            state = {
                "position": vars(position),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "early_stopping": stopper.state_dict() if stopper is not None else None,
                "best": self.best.state_dict(),
                "history": self.history,
                "rng": _rng_state(),
                "seconds": self._elapsed(),
            }
            save_checkpoint(self.run_dir / "checkpoints" / LAST_NAME, training_state=state, **common)
        for callback in self.callbacks:
            callback.on_epoch_end(int(row["epoch"]), dict(row))

    def _elapsed(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.started

    # ----------------------------------------------------------------- finish
    def _finish(self, train_set: Dataset) -> TrainResult:
        barrier(self.context)
        best_epoch = self.best.best_epoch
        best_metrics = next((row for row in self.history if row["epoch"] == best_epoch), {})
        test_metrics = None
        if self.context.is_main:
            if self.test_size:
                from covidscan.evaluation import evaluate_run

                test_metrics = evaluate_run(self.run_dir, split="test")
            payload = {
                "best_epoch": best_epoch,
                "monitor": self.best.metric,
                "best": best_metrics,
                # headline test metrics with 95% CIs; the full report is under evaluation/test/
                "test": test_metrics.get("metrics") if test_metrics else None,
                "epochs_trained": len(self.history),
                "train_size": len(train_set),
                "parameters": self.parameter_count,
                "runtime_seconds": self._elapsed(),
                "device": str(self.device),
                "world_size": self.context.world_size,
            }
            write_json(self.run_dir / "metrics.json", payload)
        barrier(self.context)
        result = TrainResult(self.run_dir, best_metrics, self.history, test_metrics)
        for callback in self.callbacks:
            callback.on_train_end(result)
        return result
