"""TensorBoard tracking: per-epoch scalars in ``<run>/tensorboard`` (``tensorboard --logdir runs``).

Training and validation values of one metric share a chart: ``loss`` and ``val_loss`` become the
tags ``loss/train`` and ``loss/val``; other values (``lr``, ``seconds``) keep their names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from covidscan.optional import optional_import
from covidscan.runtime import is_main_process
from covidscan.tracking.callbacks import TrackingCallback, final_test_scalars, numeric_metrics

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from covidscan.training.loop import TrainingLoop

_SPLIT_PREFIXES = {"val_": "val", "test_": "test"}
_TRAIN_METRICS = {"loss", "accuracy", "auc", "f1"}


def scalar_tag(name: str) -> str:
    """``val_loss`` -> ``loss/val``, ``loss`` -> ``loss/train``, ``lr`` -> ``lr``."""
    for prefix, split in _SPLIT_PREFIXES.items():
        if name.startswith(prefix):
            return f"{name[len(prefix) :]}/{split}"
    return f"{name}/train" if name in _TRAIN_METRICS else name


class TensorBoardCallback(TrackingCallback):
    """Write one event file per run under ``<run>/<subdir>`` (rank 0 only)."""

    def __init__(self, subdir: str = "tensorboard") -> None:
        self.subdir = subdir
        self.writer: SummaryWriter | None = None

    def on_fit_start(self, loop: TrainingLoop) -> None:
        if not is_main_process():
            return
        tensorboard = optional_import("torch.utils.tensorboard", extra="track")
        self.writer = tensorboard.SummaryWriter(log_dir=str(Path(loop.run_dir) / self.subdir))
        # Four leading spaces make TensorBoard's Markdown render the YAML as a code block.
        config_text = yaml.safe_dump(loop.config.to_dict(), sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in config_text.splitlines()))

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in numeric_metrics(metrics).items():
            if name != "epoch":
                self.writer.add_scalar(scalar_tag(name), value, global_step=loop.epoch)
        self.writer.flush()

    def on_fit_end(self, loop: TrainingLoop) -> None:
        if self.writer is None:
            return
        for name, value in final_test_scalars(loop).items():
            self.writer.add_scalar(f"{name}/test", value, global_step=loop.epoch)
        self.close()

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
