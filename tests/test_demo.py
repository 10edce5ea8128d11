"""The README's demo: `covidscan train --config configs/demo.yaml` trains, evaluates and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from covidscan.cli import main

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_demo_config_trains_and_evaluates_through_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "demo-run"
    code = main(
        ["train", "--config", str(DEMO_CONFIG), "--run-dir", str(run_dir), "--set", "training.phases.0.epochs=3"]
    )
    assert code == 0
    assert str(run_dir) in capsys.readouterr().out

    for name in (
        "config.yaml",
        "environment.json",
        "splits.csv",
        "label_map.json",
        "history.csv",
        "metrics.json",
        "plots/accuracy.png",
        "plots/loss.png",
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "evaluation/test/metrics.json",
    ):
        assert (run_dir / name).is_file(), name
    with (run_dir / "history.csv").open() as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2, 3]
    with (run_dir / "splits.csv").open() as handle:
        splits = {row["split"] for row in csv.DictReader(handle)}
    assert splits == {"train", "val", "test"}

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["parameters"] > 0 and metrics["runtime_seconds"] > 0
    assert metrics["best"]["val_accuracy"] > 0.5  # the synthetic lesions are learnable: beat chance
    assert metrics["test"]["accuracy"]["value"] > 0.5

    # a finished run can be resumed with a longer phase: only the new epoch is trained
    assert main(["train", "--resume", str(run_dir), "--set", "training.phases.0.epochs=4"]) == 0
    with (run_dir / "history.csv").open() as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4]
