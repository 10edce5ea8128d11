"""``train(config)``: the one entry point that turns a :class:`~covidscan.config.RunConfig` into a run directory.

It composes the parts: data preparation (:mod:`covidscan.training.data`), the model, the
:class:`~covidscan.training.loop.TrainingLoop` and its built-in callbacks (early stopping, best and
last checkpoints, history, test evaluation, ``metrics.json``), followed by the caller's callbacks.
The run directory gets splits and label map, per-epoch history and plots, ``checkpoints/best.pt`` +
``checkpoints/last.pt``, the test evaluation of the best checkpoint and ``metrics.json``.

Order matters for resume: everything that can refuse a resume (the config, the saved split, the
weights) is checked before the first byte is written to the run directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from covidscan.config import ConfigError, RunConfig, load_config
from covidscan.data import DataError, SampleSet
from covidscan.errors import UsageError
from covidscan.models import create_model_from_config
from covidscan.notices import warn_once
from covidscan.runtime import create_run_dir, resolve_device, seed_everything
from covidscan.training.callbacks import BestCheckpoint, Callback, EarlyStopping, HistoryWriter, LastCheckpoint
from covidscan.training.data import (
    build_loaders,
    build_target_loader,
    load_run_splits,
    norm_stats_for,
    write_split_files,
)
from covidscan.training.distributed import (
    DistContext,
    broadcast_object,
    device_for,
    env_context,
    init_distributed,
    shutdown,
)
from covidscan.training.domain import NOT_DISTRIBUTED, DomainAdversarial
from covidscan.training.loop import TrainingLoop
from covidscan.training.loss import ClassificationLoss, balanced_class_weights
from covidscan.training.reporting import RunSummary, TestEvaluation
from covidscan.training.resume import resume_checkpoint

if TYPE_CHECKING:
    from covidscan.evaluation.results import EvaluationReport

logger = logging.getLogger(__name__)

MONITORS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_auc")


@dataclass
class TrainResult:
    run_dir: Path
    best_metrics: dict[str, float]  # the history row of the best epoch (checkpoint_monitor)
    history: list[dict[str, float]]
    test_metrics: EvaluationReport | None  # evaluate_run's result on the test split; None without one


def train(
    config: RunConfig,
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    resume: bool = False,
    evaluate_options: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``config`` into ``run_dir`` (a new timestamped directory when None).

    ``evaluate_options`` go to the final test-split evaluation (:func:`~covidscan.evaluation.evaluate_run`'s
    keyword arguments: ``n_bootstrap``, ``target_sensitivity``, ...).

    With ``resume=True``, ``run_dir`` is an interrupted run: its ``checkpoints/last.pt`` and
    ``splits.csv`` are reloaded and training continues after the last completed epoch; a config
    that may not continue it is refused before anything in ``run_dir`` changes.
    Under ``torchrun`` every rank calls this; only rank 0 writes files and runs ``callbacks``.
    """
    if resume and run_dir is None:
        raise UsageError("resume=True needs the run directory of the interrupted run")
    context = env_context()
    device = device_for(context, resolve_device(config.training.device))
    created = init_distributed(context, device)
    try:
        return _train(
            config,
            Path(run_dir) if run_dir is not None else None,
            list(callbacks),
            resume,
            context,
            device,
            dict(evaluate_options or {}),
        )
    finally:
        shutdown(created)


def _train(
    config: RunConfig,
    run_dir: Path | None,
    callbacks: list[Callback],
    resume: bool,
    context: DistContext,
    device: torch.device,
    evaluate_options: dict[str, Any],
) -> TrainResult:
    started = time.perf_counter()
    check_plan(config, context)
    seed_everything(config.seed, config.training.deterministic)
    resumed = run_dir if resume else None
    checkpoint = resume_checkpoint(resumed, config) if resumed is not None else None
    splits = load_run_splits(config, resumed / "splits.csv" if resumed is not None else None)
    check_monitors(config, has_val=bool(splits.subset("val").samples))
    model = build_model(config, splits.class_names, checkpoint)
    # nothing above wrote a file: a refused resume leaves its run directory exactly as it was
    run_dir = start_run_dir(config, run_dir, splits, context)
    stats = norm_stats_for(config, splits, checkpoint.get("norm_stats") if checkpoint else None)
    loaders = build_loaders(config, splits, stats, context, device)
    weights = None
    if config.training.class_weights == "balanced":
        weights = balanced_class_weights(splits.subset("train").labels(), splits.class_names)
        logger.info("balanced class weights: %s", dict(zip(splits.class_names, weights.tolist())))
    torch.manual_seed(config.seed + context.rank)  # distinct augmentation streams per rank

    training = config.training
    best = BestCheckpoint(training.checkpoint_monitor, training.checkpoint_mode)
    evaluation = TestEvaluation(**evaluate_options) if splits.subset("test").samples else None
    stopping = training.early_stopping
    adaptation = training.domain_adaptation
    builtins: list[Callback | None] = [
        DomainAdversarial(
            build_target_loader(config, splits.class_names, stats, device),
            weight=adaptation.weight,
            hidden=adaptation.hidden,
            lr=adaptation.lr,
        )
        if adaptation
        else None,
        EarlyStopping(stopping.monitor, stopping.patience, stopping.mode, stopping.min_delta) if stopping else None,
        best,
        HistoryWriter(),
        LastCheckpoint(),  # after the callbacks whose epoch-end state it saves, before the caller's
        evaluation,
        RunSummary(best, loaders.train_size, evaluation),
    ]
    loop = TrainingLoop(
        model,
        loaders.train,
        loaders.val,
        phases=training.phases,
        criterion=ClassificationLoss(config.model.head, len(splits.class_names), weights),
        config=config,
        run_dir=run_dir,
        class_names=splits.class_names,
        norm_stats=stats,
        callbacks=[c for c in builtins if c is not None] + callbacks,
        device=device,
        context=context,
        started=started,
    )
    if checkpoint is not None:
        loop.load_state_dict(checkpoint["training_state"])
        logger.info("resuming %s after epoch %d", run_dir, loop.epoch)
    loop.fit()
    return TrainResult(run_dir, best.best_row(loop.history), loop.history, evaluation.result if evaluation else None)


def check_plan(config: RunConfig, context: DistContext) -> None:
    """Refuse plans that cannot run or would silently train the wrong thing, before any data is read."""
    training, model = config.training, config.model
    if training.batch_size % context.world_size:
        raise ConfigError(
            f"training.batch_size {training.batch_size} is the global batch and must be divisible "
            f"by the number of processes ({context.world_size})"
        )
    check_weights_run(config)
    if training.domain_adaptation is not None:
        if config.data.spatial_dims != 2:
            raise ConfigError("training.domain_adaptation works on 2D images (data.spatial_dims: 2) for now")
        if context.enabled:
            raise ConfigError(f"training.domain_adaptation: {NOT_DISTRIBUTED}")
    if model.pretrained or model.weights or model.allow_random_frozen:
        return
    for index, phase in enumerate(training.phases):
        if phase.trainable == "all":
            return  # the whole network has trained before anything is frozen
        raise ConfigError(
            f"training.phases.{index}.trainable is {phase.trainable!r} but model {model.name!r} starts from "
            "random weights (model.pretrained: false, no model.weights): the phase would train on frozen random "
            "features; set model.pretrained: true or model.weights: FILE, train 'all' first, or set "
            "model.allow_random_frozen: true if a frozen random backbone is what you want"
        )


# input preprocessing a backbone learns to see: fine-tuning with other settings feeds it other images
PREPROCESSING_KEYS = ("channels", "window", "normalize", "intensity", "lung")


def check_weights_run(config: RunConfig) -> None:
    """Warn when ``model.weights`` is a run directory trained with other input preprocessing (a
    shipped lung-masked, CLAHE or Inception-normalised model fine-tuned with a plain config)."""
    weights = config.model.weights
    saved_config = Path(weights).expanduser() / "config.yaml" if weights else None
    if saved_config is None or not saved_config.is_file():
        return
    try:
        saved = load_config(saved_config)
    except (ConfigError, OSError):
        return  # not a readable run config: the weights are still loaded and checked tensor by tensor
    differences = [
        f"data.{key} {getattr(saved.data, key)!r} there, {getattr(config.data, key)!r} here"
        for key in PREPROCESSING_KEYS
        if getattr(saved.data, key) != getattr(config.data, key)
    ]
    if differences:
        warn_once(
            f"weights-preprocessing:{saved_config}",
            f"model.weights {weights} was trained with other input preprocessing ({'; '.join(differences)}): "
            "its backbone will see images unlike those it learned from; set the same values unless that is "
            "the point",
        )


def check_monitors(config: RunConfig, has_val: bool) -> None:
    training = config.training
    monitors = {"training.checkpoint_monitor": training.checkpoint_monitor}
    if training.early_stopping is not None:
        monitors["training.early_stopping.monitor"] = training.early_stopping.monitor
    for key, metric in monitors.items():
        if metric not in MONITORS:
            raise ConfigError(f"{key}: unknown metric {metric!r}; choose one of {list(MONITORS)}")
        if metric.startswith("val_") and not has_val:
            raise ConfigError(
                f"{key} is {metric!r} but the split has no validation part; give "
                "data.split.ratios a val share or monitor 'loss'"
            )


def build_model(config: RunConfig, class_names: Sequence[str], checkpoint: dict[str, Any] | None = None) -> nn.Module:
    """The registry model for ``config``; with a resume ``checkpoint``, its weights (no download needed)."""
    model = create_model_from_config(config, len(class_names), load_weights=checkpoint is None)
    if checkpoint is not None:
        if list(checkpoint["class_names"]) != list(class_names):
            raise DataError(
                f"{checkpoint['path']}: trained on classes {checkpoint['class_names']} but the data now gives "
                f"{list(class_names)}; resume with the run's own data"
            )
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as exc:
            raise ConfigError(
                f"{checkpoint['path']}: its weights do not fit model {config.model.name!r}: {str(exc).splitlines()[0]}"
            ) from exc
    return model


def start_run_dir(config: RunConfig, run_dir: Path | None, splits: SampleSet, context: DistContext) -> Path:
    """Create (or refresh, on resume) the run directory on rank 0: config, environment, split files
    and the leakage gate; every rank gets the directory, and every rank stops when the gate refuses."""
    path, refusal = None, None
    if context.is_main:
        path = create_run_dir(config, run_dir)
        refusal = write_split_files(splits, path, config.training.strict_leakage)
    path, refusal = broadcast_object((str(path) if path else None, refusal), context)  # none waits forever
    if refusal:
        raise DataError(refusal)
    return Path(path)
