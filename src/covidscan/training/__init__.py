"""The one trainer: phases, schedules, early stopping, checkpoints, resume and DDP (``torchrun``)."""

from covidscan.training.callbacks import Callback, EarlyStopping, Monitor
from covidscan.training.trainer import ClassificationLoss, TrainResult, balanced_class_weights, train

__all__ = [
    "Callback",
    "ClassificationLoss",
    "EarlyStopping",
    "Monitor",
    "TrainResult",
    "balanced_class_weights",
    "train",
]
