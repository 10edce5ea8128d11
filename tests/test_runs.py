"""``covidscan runs list/show`` from run directories alone, including crashed and broken runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from covidscan.cli import main
from covidscan.config import RunConfig, config_from_dict
from covidscan.tracking import find_run_dirs, format_runs, list_runs, show_run, summarize_run

HISTORY_COLUMNS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "lr", "seconds"]


def make_run(
    root: Path,
    name: str,
    *,
    val_losses: list[float],
    test: dict | None = None,
    finished: bool = True,
    time_utc: str = "2026-11-22T10:00:00+00:00",
    config: RunConfig | None = None,
) -> Path:
    """A run directory as the trainer leaves it (metrics.json only once training finished)."""
    run_dir = root / name
    (run_dir / "checkpoints").mkdir(parents=True)
    config = config or config_from_dict(
        {"name": name, "model": {"name": "cnn2"}, "training": {"phases": [{"epochs": 5}]}}
    )
    config.save(run_dir / "config.yaml")
    (run_dir / "environment.json").write_text(json.dumps({"time_utc": time_utc}))
    rows = [
        {
            "epoch": i + 1,
            "phase": 1,
            "loss": 0.7,
            "accuracy": 0.5,
            "val_loss": v,
            "val_accuracy": 0.5,
            "val_auc": 0.5,
            "lr": 1e-3,
            "seconds": 2.0,
        }
        for i, v in enumerate(val_losses)
    ]
    with (run_dir / "history.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if finished:
        best = min(rows, key=lambda row: row["val_loss"])
        (run_dir / "metrics.json").write_text(
            json.dumps(
                {
                    "best_epoch": best["epoch"],
                    "monitor": "val_loss",
                    "best": best,
                    "test": test,
                    "epochs_trained": len(rows),
                    "runtime_seconds": 2.0 * len(rows),
                }
            )
        )
    return run_dir


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    test = {
        "metrics": {
            "accuracy": {"value": 0.9, "ci_low": 0.85, "ci_high": 0.94},
            "f1": {"value": 0.88, "ci_low": 0.8, "ci_high": 0.93},
            "roc_auc": {"value": 0.95, "ci_low": 0.9, "ci_high": 0.99},
        },
        "per_class": {"COVID": {"f1": 0.1}},
    }
    make_run(root, "good", val_losses=[0.6, 0.4, 0.5], test=test, time_utc="2026-11-22T09:00:00+00:00")
    make_run(
        root,
        "flat",
        val_losses=[0.5, 0.45],
        test={"accuracy": 0.7, "macro_f1": 0.6, "macro_auroc": 0.8},
        time_utc="2026-11-22T11:00:00+00:00",
    )
    make_run(root, "crashed", val_losses=[0.65, 0.3], finished=False, time_utc="2026-11-22T12:00:00+00:00")
    make_run(root / "sweeps" / "s", "trial000", val_losses=[], finished=False, time_utc="2026-11-22T08:00:00+00:00")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("model: [unclosed")
    return root


def test_list_finds_every_run_with_its_status_and_metrics(runs_root):
    runs = {run.name: run for run in list_runs(runs_root)}
    assert set(runs) == {"good", "flat", "crashed", "trial000", "broken"}
    assert runs["good"].status == "complete"
    assert (runs["good"].best, runs["good"].best_epoch, runs["good"].epochs) == (0.4, 2, 3)
    assert (runs["good"].test_accuracy, runs["good"].test_f1, runs["good"].test_auc) == (0.9, 0.88, 0.95)
    assert (runs["flat"].test_f1, runs["flat"].test_auc) == (0.6, 0.8)  # multi-class names
    assert runs["crashed"].status == "incomplete"
    assert (runs["crashed"].best, runs["crashed"].epochs, runs["crashed"].planned_epochs) == (0.3, 2, 5)
    assert runs["crashed"].runtime_seconds == 4.0
    assert runs["trial000"].status == "not started"
    assert runs["broken"].status == "unreadable"
    assert runs["good"].model == "cnn2" and runs["good"].dataset == "sample"


def test_list_is_newest_first_and_sorts_by_a_metric(runs_root):
    # "broken" records no start time (no environment.json, no timestamp in its name): undated, listed last
    assert [run.name for run in list_runs(runs_root)] == ["crashed", "flat", "good", "trial000", "broken"]
    assert [run.name for run in list_runs(runs_root, sort="test_auc")][:2] == ["good", "flat"]
    assert [run.name for run in list_runs(runs_root, sort="best", ascending=True)][:2] == ["crashed", "good"]
    with pytest.raises(ValueError, match="not a column"):
        list_runs(runs_root, sort="auc")


def test_undated_runs_take_the_folder_timestamp_or_none(tmp_path):
    for name in ("demo-20261101-120000", "demo-20261101-120000-2", "renamed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("name: demo\n")
    runs = {run.name: run for run in list_runs(tmp_path)}
    assert runs["demo-20261101-120000"].date == "2026-11-01T12:00:00"
    assert runs["demo-20261101-120000-2"].date == "2026-11-01T12:00:00"
    assert runs["renamed"].date is None
    assert list_runs(tmp_path)[-1].name == "renamed"
    assert "date      undated" in show_run(tmp_path / "renamed")
    assert format_runs(list_runs(tmp_path)).splitlines()[-1].split()[:2] == ["renamed", "-"]


def test_run_folders_inside_a_run_are_not_runs(runs_root):
    (runs_root / "good" / "evaluation" / "test").mkdir(parents=True)
    (runs_root / "good" / "evaluation" / "test" / "config.yaml").write_text("name: x\n")
    assert len(find_run_dirs(runs_root)) == 5
    assert find_run_dirs(runs_root / "good") == [runs_root / "good"]


def test_formats(runs_root):
    runs = list_runs(runs_root)
    table = format_runs(runs).splitlines()
    assert table[0].split()[:3] == ["name", "date", "status"] and len(table) == 2 + len(runs)
    rows = list(csv.DictReader(format_runs(runs, "csv").splitlines()))
    assert {row["name"] for row in rows} == {run.name for run in runs}
    assert json.loads(format_runs(runs, "json"))[0]["name"] == runs[0].name
    assert format_runs([]) == "no runs found"


def test_show_prints_config_metrics_with_intervals_and_history(runs_root):
    text = show_run(runs_root / "good")
    assert "status    complete" in text and "model     cnn2" in text
    assert "best      val_loss = 0.4000 at epoch 2" in text
    assert "[0.8500, 0.9400] 95% CI" in text
    assert "per_class" not in text
    assert text.count("\n  ") >= 3 + 3  # three test metrics, history header + rows
    assert "status    unreadable" in show_run(runs_root / "broken")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        show_run(runs_root / "sweeps")


def test_cli_list_and_show(runs_root, capsys):
    assert main(["runs", "list", str(runs_root), "--format", "json", "--sort", "test_accuracy"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [run["name"] for run in listed][:2] == ["good", "flat"]
    assert main(["runs", "show", str(runs_root / "crashed")]) == 0
    assert "incomplete" in capsys.readouterr().out
    assert main(["runs", "list", str(runs_root / "missing")]) == 2
    assert "runs folder not found" in capsys.readouterr().err


def test_summary_of_a_real_training_run(tmp_path):
    from covidscan.training import train

    config = config_from_dict(
        {
            "output_dir": str(tmp_path),
            "data": {"image_size": 32, "max_per_class": 8, "channels": 1, "split": {"ratios": [0.6, 0.4, 0.0]}},
            "training": {"batch_size": 8, "phases": [{"epochs": 1}]},
        }
    )
    result = train(config)
    summary = summarize_run(result.run_dir)
    assert summary.status == "complete" and summary.epochs == 1
    assert summary.best == pytest.approx(result.best_metrics["val_loss"])
    assert summary.runtime_seconds is not None and summary.runtime_seconds > 0
