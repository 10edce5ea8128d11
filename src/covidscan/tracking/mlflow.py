"""MLflow tracking: every run's resolved config as params, each epoch's metrics, and its files.

The default store is a SQLite file beside the runs (``sqlite:///<output_dir>/mlflow.db``, artefacts
under ``<output_dir>/mlartifacts``): MLflow 3 refuses a plain ``file://`` store, and SQLite needs
no server. Point ``tracking_uri`` at a server (``http://host:5000``) to share runs with a team;
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` browses the local store.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covidscan.optional import optional_import
from covidscan.runtime import is_main_process
from covidscan.tracking.callbacks import TrackingCallback, final_test_scalars, flatten, numeric_metrics

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from covidscan.training.loop import TrainingLoop

logger = logging.getLogger(__name__)

# Files and folders of a run directory worth keeping next to its metrics (checkpoints stay local).
RUN_ARTEFACTS = (
    "config.yaml",
    "environment.json",
    "label_map.json",
    "splits.csv",
    "history.csv",
    "metrics.json",
    "plots",
    "evaluation",
)
_BATCH = 100  # MLflow's limit on params or metrics per log_batch request
_MAX_PARAM_LENGTH = 6000


def default_tracking_uri(output_dir: str | Path) -> str:
    """``sqlite:///<absolute output_dir>/mlflow.db``."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{output_dir / 'mlflow.db'}"


def _client(tracking_uri: str) -> MlflowClient:
    return optional_import("mlflow", extra="track").MlflowClient(tracking_uri=tracking_uri)


class MLflowCallback(TrackingCallback):
    """Log one trainer run as one MLflow run (rank 0 only).

    ``tracking_uri`` defaults to the SQLite store in the config's ``output_dir``; ``experiment``
    defaults to the config's ``name``. ``tags`` are added to the run (a sweep tags its trials).
    """

    def __init__(
        self, tracking_uri: str | None = None, experiment: str | None = None, tags: dict[str, str] | None = None
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._run_dir: Path | None = None

    def on_fit_start(self, loop: TrainingLoop) -> None:
        if not is_main_process():
            return
        config = loop.config
        self._run_dir = Path(loop.run_dir)
        uri = self.tracking_uri or default_tracking_uri(config.output_dir)
        self._client = _client(uri)
        name = self.experiment or config.name
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            # A local store keeps artefacts beside it; a server chooses its own artefact root.
            location = (
                (Path(config.output_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
            )
            experiment_id = self._client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run_dir_tag = str(self._run_dir.resolve())
        # A resumed run (``covidscan train --resume``) continues its MLflow run instead of starting a second one.
        previous = self._client.search_runs(
            [experiment_id], f"tags.`covidscan.run_dir` = '{run_dir_tag}'", max_results=1
        )
        if previous:
            self.run_id = previous[0].info.run_id
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"covidscan.run_dir": run_dir_tag, "covidscan.model": config.model.name, **self.tags}
            self.run_id = self._client.create_run(experiment_id, run_name=self._run_dir.name, tags=tags).info.run_id
            self._log_params(flatten(config.to_dict()))
        logger.info("MLflow run %s in experiment %r at %s", self.run_id, name, uri)

    def _active(self) -> tuple[MlflowClient, str, Path]:
        """Client, run id and run directory of the MLflow run in progress (set by ``on_train_start``)."""
        if self._client is None or self.run_id is None or self._run_dir is None:
            raise RuntimeError("MLflowCallback has no MLflow run in progress (on_train_start did not run)")
        return self._client, self.run_id, self._run_dir

    def _log_params(self, params: dict[str, Any]) -> None:
        client, run_id, _ = self._active()
        entities = optional_import("mlflow.entities", extra="track")
        entries = [entities.Param(key, str(value)[:_MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(entries), _BATCH):
            client.log_batch(run_id, params=entries[start : start + _BATCH])

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        client, run_id, _ = self._active()
        entities = optional_import("mlflow.entities", extra="track")
        now = int(time.time() * 1000)
        entries = [entities.Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(entries), _BATCH):
            client.log_batch(run_id, metrics=entries[start : start + _BATCH])

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        if self.run_id is None:
            return
        self._log_metrics(numeric_metrics(metrics), step=loop.epoch)

    def on_fit_end(self, loop: TrainingLoop) -> None:
        if self.run_id is None:
            return
        test = final_test_scalars(loop)
        self._log_metrics({f"test_{key}": value for key, value in test.items()}, step=loop.epoch)
        self.close("FINISHED")

    def close(self, status: str = "FINISHED") -> None:
        """Upload the run directory's files and end the MLflow run with ``status``."""
        if self.run_id is None:
            return
        client, run_id, run_dir = self._active()
        for name in RUN_ARTEFACTS:
            path = run_dir / name
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=name)
            elif path.is_file():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status=status)
        self.run_id = None
