"""The one trainer: data preparation, a training loop with stateful callbacks, checkpoints, resume and
DDP (``torchrun``). ``train(config)`` is the entry point; ``TrainingLoop`` + callbacks are the parts."""

from covidscan.training.callbacks import (
    EMA,
    BestCheckpoint,
    Callback,
    EarlyStopping,
    HistoryWriter,
    LastCheckpoint,
    Monitor,
    PhaseCheckpoints,
    phase_checkpoint_name,
)
from covidscan.training.loop import TrainingLoop
from covidscan.training.loss import ClassificationLoss, balanced_class_weights
from covidscan.training.reporting import RunSummary, TestEvaluation
from covidscan.training.trainer import TrainResult, train

__all__ = [
    "EMA",
    "BestCheckpoint",
    "Callback",
    "ClassificationLoss",
    "EarlyStopping",
    "HistoryWriter",
    "LastCheckpoint",
    "Monitor",
    "PhaseCheckpoints",
    "RunSummary",
    "TestEvaluation",
    "TrainResult",
    "TrainingLoop",
    "balanced_class_weights",
    "phase_checkpoint_name",
    "train",
]
