"""What a run reports when training ends: the test-split evaluation of the best checkpoint and
``metrics.json``, as callbacks.

This is where training depends on evaluation, and only here: the dependency runs one way
(``covidscan.training`` -> ``covidscan.evaluation``; evaluation never imports training), and the
loop and the other callbacks do not know it exists. ``TestEvaluation(**options)`` passes evaluation
options (``n_bootstrap``, ``target_sensitivity``, ...) through, so a caller that wants its own
(``crossval``) does not evaluate the test split a second time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidscan.evaluation import evaluate_run
from covidscan.evaluation.results import EvaluationReport, metrics_to_dict
from covidscan.runtime import write_json
from covidscan.training.callbacks import BestCheckpoint, Callback

if TYPE_CHECKING:
    from covidscan.training.loop import TrainingLoop

logger = logging.getLogger(__name__)


class TestEvaluation(Callback):
    """Evaluate ``checkpoints/best.pt`` on the run's test split when training ends (report under
    ``evaluation/test/``); ``result`` holds the evaluation, read by trackers and :func:`train`."""

    __test__ = False  # a class named Test* is not a pytest test class

    def __init__(self, **options: Any) -> None:
        self.options = options  # evaluate_run's keyword arguments
        self.result: EvaluationReport | None = None

    def on_fit_end(self, loop: TrainingLoop) -> None:
        self.result = evaluate_run(loop.run_dir, split="test", **self.options)


class RunSummary(Callback):
    """``metrics.json``: the best epoch's row, the headline test metrics with 95% CIs, epochs
    trained, training-set size, parameter count, runtime, device and world size."""

    def __init__(self, best: BestCheckpoint, train_size: int, evaluation: TestEvaluation | None = None) -> None:
        self.best = best
        self.train_size = train_size
        self.evaluation = evaluation

    def on_fit_end(self, loop: TrainingLoop) -> None:
        write_json(Path(loop.run_dir) / "metrics.json", self.summary(loop))

    def summary(self, loop: TrainingLoop) -> dict[str, Any]:
        test = self.evaluation.result if self.evaluation is not None else None
        return {
            "best_epoch": self.best.best_epoch,
            "monitor": self.best.monitor.metric,
            "best": self.best.best_row(loop.history),
            # headline test metrics with 95% CIs; the full report is under evaluation/test/
            "test": metrics_to_dict(test.metrics) if test is not None else None,
            "epochs_trained": len(loop.history),
            "train_size": self.train_size,
            "parameters": sum(p.numel() for p in loop.model.parameters()),
            "runtime_seconds": loop.elapsed(),
            "device": str(loop.device),
            "world_size": loop.context.world_size,
        }
