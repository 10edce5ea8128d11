"""MLflow and TensorBoard tracking callbacks on a tiny real training run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from covidscan.cli import main
from covidscan.config import RunConfig, load_config
from covidscan.evaluation.metrics import MetricValue
from covidscan.tracking import (
    MLflowCallback,
    TensorBoardCallback,
    callbacks_from_args,
    closing_on_error,
    flatten,
    make_trackers,
)
from covidscan.tracking.callbacks import evaluation_scalars
from covidscan.tracking.tensorboard import scalar_tag
from covidscan.training.history import read_history

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


TINY = [
    "data.image_size=32",
    "data.max_per_class=16",
    "data.split.ratios=[0.6, 0.2, 0.2]",
    "training.phases.0.epochs=2",
    "training.batch_size=8",
]  # the demo config shrunk to seconds


def tiny_config(output_dir: Path) -> RunConfig:
    return load_config(DEMO, [f"output_dir={output_dir}", *TINY])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One run of ``covidscan train --track mlflow tensorboard`` (training once keeps this file fast)."""
    output_dir = tmp_path_factory.mktemp("tracked")
    overrides = [arg for item in [f"output_dir={output_dir}", *TINY] for arg in ("--set", item)]
    assert main(["train", "--config", str(DEMO), *overrides, "--track", "mlflow", "tensorboard"]) == 0
    (run_dir,) = [path.parent for path in output_dir.glob("*/history.csv")]
    return tiny_config(output_dir), run_dir, read_history(run_dir / "history.csv")


def test_mlflow_logs_params_metrics_and_artefacts(tracked_run):
    from mlflow import MlflowClient

    config, run_dir, history = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(config.output_dir).resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(config.name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_dir.name
    assert run.data.params["training.phases.0.lr"] == str(config.training.phases[0].lr)
    assert run.data.params["model.name"] == config.model.name
    val_loss = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val_loss] == [row["epoch"] for row in history]
    assert [m.value for m in val_loss] == pytest.approx([row["val_loss"] for row in history])
    assert 0 <= run.data.metrics["test_accuracy"] <= 1  # the test evaluation after training
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "history.csv", "metrics.json", "plots", "evaluation"} <= artefacts
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")} >= {"loss.png"}


def test_tensorboard_event_file_holds_the_epoch_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, history = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"loss/train", "loss/val", "accuracy/val", "lr", "accuracy/test"} <= set(events.Tags()["scalars"])
    logged = events.Scalars("loss/val")
    assert [e.step for e in logged] == [row["epoch"] for row in history]
    assert [e.value for e in logged] == pytest.approx([row["val_loss"] for row in history], rel=1e-5)


def test_trackers_write_nothing_off_rank_zero(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    loop = SimpleNamespace(run_dir=tmp_path / "run", config=tiny_config(tmp_path), epoch=1)
    for tracker in (MLflowCallback(), TensorBoardCallback()):
        tracker.on_fit_start(loop)
        tracker.on_epoch_end(loop, {"loss": 0.5})
        tracker.close()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("error, status", [(RuntimeError("out of memory"), "FAILED"), (optuna.TrialPruned(), "KILLED")])
def test_a_run_that_raises_ends_failed_or_killed(tracked_run, tmp_path, error, status):
    from mlflow import MlflowClient

    config, _, _ = tracked_run  # reuse its store: creating an MLflow database takes seconds
    uri = f"sqlite:///{Path(config.output_dir).resolve() / 'mlflow.db'}"
    tracker = MLflowCallback(tracking_uri=uri, experiment=f"raised-{status}")
    loop = SimpleNamespace(run_dir=tmp_path, config=config, epoch=1)
    with pytest.raises(type(error)), closing_on_error([tracker]):
        tracker.on_fit_start(loop)
        tracker.on_epoch_end(loop, {"loss": 0.7, "val_loss": float("nan")})
        raise error
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(f"raised-{status}").experiment_id])
    assert run.info.status == status
    assert run.data.metrics == {"loss": 0.7}  # NaN is not sent to MLflow


def test_a_resumed_run_continues_its_mlflow_run(tracked_run):
    from mlflow import MlflowClient

    config, run_dir, history = tracked_run
    uri = f"sqlite:///{Path(config.output_dir).resolve() / 'mlflow.db'}"
    tracker = MLflowCallback(tracking_uri=uri)
    loop = SimpleNamespace(run_dir=run_dir, config=config, epoch=len(history) + 1)
    tracker.on_fit_start(loop)
    tracker.on_epoch_end(loop, {"val_loss": 0.1})
    tracker.close()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.name).experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")][-1] == len(history) + 1


def test_flatten_gives_the_dotted_keys_of_set_overrides():
    tree = {"training": {"phases": [{"lr": 0.1}], "batch_size": 8}, "data": {"split": {"ratios": [0.8, 0.1, 0.1]}}}
    assert flatten(tree) == {
        "training.phases.0.lr": 0.1,
        "training.batch_size": 8,
        "data.split.ratios": [0.8, 0.1, 0.1],
    }


def test_scalar_tags_pair_train_and_validation():
    assert [scalar_tag(n) for n in ("loss", "val_loss", "val_auc", "lr")] == ["loss/train", "loss/val", "auc/val", "lr"]


def test_tracker_selection_from_the_command_line():
    import argparse

    from covidscan.tracking import add_tracking_arguments

    parser = argparse.ArgumentParser()
    add_tracking_arguments(parser)
    trackers = callbacks_from_args(
        parser.parse_args(["--track", "mlflow", "tensorboard", "--tracking-uri", "http://mlflow:5000"])
    )
    assert [type(t) for t in trackers] == [MLflowCallback, TensorBoardCallback]
    assert trackers[0].tracking_uri == "http://mlflow:5000"
    assert callbacks_from_args(parser.parse_args([])) == []
    with pytest.raises(ValueError, match="wandb"):
        make_trackers(["wandb"])


def test_test_scalars_keep_the_headline_metrics_with_intervals():
    evaluation = SimpleNamespace(  # the attributes of an EvaluationReport that the trackers read
        n_items=40,
        metrics={
            "accuracy": MetricValue(0.9, ci_low=0.8, ci_high=0.95),
            "roc_auc": MetricValue(None, undefined="one class"),
        },
    )
    assert evaluation_scalars(evaluation) == {"accuracy": 0.9, "accuracy_ci_low": 0.8, "accuracy_ci_high": 0.95}
    assert evaluation_scalars(None) == {}
