"""``covidscan study run``: a tiny study trained end to end, its paper table (CIs, Fisher stars,
published numbers), resumption that trains nothing twice, and the study-file checks."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from covidscan.config import ConfigError
from covidscan.models import create_model_from_config
from covidscan.studies import list_studies, load_study, plan_runs, run_study
from covidscan.studies.spec import expand_grid
from helpers import write_image_folder

ROOT = Path(__file__).resolve().parents[1]

RUN_CONFIG = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "source": "data",
        "image_size": 32,
        "channels": 1,
        "normalize": "sample",
        "split": {"method": "stratified", "ratios": [0.5, 0.25, 0.25]},
    },
    "model": {"name": "cnn1"},
    "training": {"batch_size": 8, "phases": [{"epochs": 3, "lr": 0.001}]},
}

STUDY = {
    "name": "tiny_study",
    "title": "Tiny study",
    "summary": "Two tiny CNNs; the second trains in two phases.",
    "substitutions": ["DATA: synthetic images stand in for the study's own"],
    "runs": [
        {"id": "a", "label": "CNN A", "config": "run.yaml"},
        {
            "id": "b",
            "label": "CNN B",
            "config": "run.yaml",
            "overrides": ["training.phases=[{epochs: 3, lr: 0.01}, {epochs: 3, lr: 0.001}]"],
        },
    ],
    "tables": [
        {
            "id": "t1",
            "title": "Table 1: two CNNs",
            "rows": [{"run": "a", "published": {"accuracy": 0.9}}, "b"],
            "metrics": ["accuracy", "sensitivity", "specificity"],
            "runtime": True,
            "figures": ["confusion", "grid", "gradcam"],
        },
        {
            "id": "t2",
            "title": "Table 2: initial vs fine-tuned",
            "rows": [{"run": "b", "checkpoint": "phase-1", "label": "initial"}, {"run": "b", "label": "fine-tuned"}],
            "metrics": ["accuracy", "f1", "roc_auc"],
        },
    ],
    "submission": {"input": "unlabeled", "table": "t1"},
    "gradcam": {"images": 1},
    "quick": {"max_per_class": 8, "image_size": 32, "epochs": 1, "bootstrap": 50},
}


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    write_image_folder(tmp_path / "data", {"COVID": 8, "normal": 8})
    write_image_folder(tmp_path / "unlabeled_src", {"x": 3}, seed=1)
    shutil.move(tmp_path / "unlabeled_src" / "x", tmp_path / "unlabeled")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    return path


def _modified_times(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}


def test_study_trains_every_run_writes_the_table_skips_finished_runs_and_resumes(
    study_file, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    report = run_study(study_file, out, quick=True)

    assert [(o.id, o.status) for o in report.runs] == [("a", "trained"), ("b", "trained")]
    assert (out / "runs" / "b" / "checkpoints" / "phase-1.pt").is_file()  # study E's "initial" model
    for name in ("report.html", "report.md", "report.csv", "report.json"):
        assert (out / name).is_file()

    table = report.table("t1")
    assert [row.key for row in table.rows] == ["a", "b"]
    assert [row.label for row in table.rows] == ["CNN A", "CNN B"]
    assert table.split == "test" and table.bootstrap.n_resamples == 50
    assert table.rows[0].fisher is None  # the reference row
    fisher = table.rows[1].fisher
    assert fisher is not None and fisher.test == "Fisher exact" and 0.0 <= fisher.p_value <= 1.0
    for row in table.rows:
        assert row.runtime_seconds is not None and row.runtime_seconds > 0 and row.parameters > 0
        for metric in row.metrics.values():
            if metric.value is not None:
                assert metric.ci_low <= metric.value <= metric.ci_high
        assert {"confusion", "grid", "gradcam"} <= set(row.figures)
        assert all((out / f).is_file() for files in row.figures.values() for f in files)
    assert table.rows[0].published == {"accuracy": 0.9}
    assert [row.key for row in report.table("t2").rows] == ["b@phase-1", "b"]

    markdown = (out / "report.md").read_text()
    for text in ("Table 1: two CNNs", "| CNN A |", "| CNN B |", "| initial |", "| fine-tuned |", "QUICK SMOKE RUN"):
        assert text in markdown
    assert "Accuracy (95% CI)" in markdown and "Accuracy, published" in markdown and "Fisher p vs row 1" in markdown
    assert "DATA: synthetic images stand in" in markdown
    with (out / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["table"], r["row"]) for r in rows] == [("t1", "a"), ("t1", "b"), ("t2", "b@phase-1"), ("t2", "b")]
    assert {"accuracy_ci_low", "accuracy_ci_high", "accuracy_published", "fisher_p_vs_first", "fisher_stars"} <= set(
        rows[0]
    )
    assert float(rows[0]["accuracy_published"]) == 0.9 and rows[1]["fisher_p_vs_first"] != ""

    submission = out / report.submission["file"]
    with submission.open() as handle:
        assert len(list(csv.DictReader(handle))) == 3  # one line per unlabeled image

    trained = _modified_times(out)
    with caplog.at_level(logging.INFO, logger="covidscan.studies.runner"):
        assert run_study(study_file, out, quick=True, train_only=True) is None  # train_only: no tables
    assert "run a finished before, skipped" in caplog.text and "run b finished before, skipped" in caplog.text
    assert _modified_times(out) == trained  # nothing was trained again

    with pytest.raises(ConfigError, match="run a .*another config"):
        run_study(study_file, out, quick=True, overrides=["training.phases.0.epochs=2"])

    (out / "runs" / "a" / "metrics.json").unlink()  # as if killed after its last epoch was saved
    shutil.rmtree(out / "runs" / "b" / "checkpoints")  # as if killed before its first epoch ended
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="covidscan.studies.runner"):
        run_study(study_file, out, quick=True, train_only=True)
    assert "resuming run a" in caplog.text and "training run b" in caplog.text
    assert (out / "runs" / "a" / "metrics.json").is_file() and (
        out / "runs" / "b" / "checkpoints" / "phase-1.pt"
    ).is_file()


def test_study_file_errors_name_the_key(study_file):
    bad_metric = {**STUDY, "tables": [{**STUDY["tables"][0], "metrics": ["acuracy"]}]}
    study_file.write_text(yaml.safe_dump(bad_metric))
    with pytest.raises(ConfigError, match="tables.t1.metrics"):
        load_study(study_file)
    unknown_row = {**STUDY, "tables": [{**STUDY["tables"][0], "rows": ["a", "nope"]}]}
    study_file.write_text(yaml.safe_dump(unknown_row))
    with pytest.raises(ConfigError, match="'nope' matches no run id"):
        load_study(study_file)
    with pytest.raises(ConfigError, match="no study 'Z'"):
        load_study("Z")


@pytest.mark.parametrize("study", ["A", "B", "C", "D", "E"])
def test_every_quick_run_of_a_shipped_study_builds_its_model(study, monkeypatch, tmp_path):
    """`study run X --quick` must not stop at a model that cannot take the quick input size."""
    monkeypatch.chdir(ROOT)
    spec = load_study(study)
    for run in plan_runs(spec, tmp_path, quick=True).values():
        create_model_from_config(run.config, 3, load_weights=False)


def test_shipped_studies_load_and_study_c_quick_keeps_its_grid_subset(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    names = [load_study(path).name for path in list_studies()]
    assert names == ["study_a", "study_b", "study_c", "study_d", "study_e"]
    spec = load_study("C")
    grid = spec.runs[0]
    assert len(expand_grid(grid)) == len(grid.grid["data.depth"]) * len(grid.grid["training.batch_size"])
    planned = plan_runs(spec, tmp_path, quick=True)
    quick_grid = [run for run in planned.values() if run.id.startswith("resnet3d_18-d")]
    assert len(quick_grid) == len(spec.quick.grid["data.depth"]) * len(spec.quick.grid["training.batch_size"])
    for run in quick_grid:
        assert run.id == f"resnet3d_18-d{run.config.data.depth}-b{run.config.training.batch_size}"
        assert run.config.data.image_size == spec.quick.image_size
        assert all(phase.epochs == spec.quick.epochs for phase in run.config.training.phases)
