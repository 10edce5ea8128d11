"""covidscan crossval on tiny synthetic sources: the matrix, the gap, the report and resuming."""

from __future__ import annotations

import csv
import importlib
import json
import warnings
from pathlib import Path

import pytest

from covidscan.cli import main
from covidscan.config import ConfigError, config_from_dict
from covidscan.data import LeakageWarning
from covidscan.tracking.crossval import cross_validate
from covidscan.training import Callback
from helpers import write_image_folder

SIZE = 16


class Interrupted(Exception):
    """Stands in for a killed process."""


class NoTraining(Callback):
    """Fails the test if any fold starts training."""

    def on_fit_start(self, loop) -> None:
        raise AssertionError(f"{loop.run_dir} was trained again")


class StopInFold(Callback):
    """Interrupts the fold holding ``source`` out after its first epoch (the checkpoint is saved first)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def on_epoch_end(self, loop, metrics) -> None:
        if Path(loop.run_dir).name == f"holdout-{self.source}":
            raise Interrupted(f"stopped after epoch {loop.epoch}")


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    """Hospitals a and b: COVID images are dark; hospital c: COVID images are bright (a source shift
    no model trained on a and b can survive), with c's own label names."""
    return {
        "a": write_image_folder(tmp_path / "a", {"COVID": 12, "normal": 12}, size=SIZE, seed=0),
        "b": write_image_folder(tmp_path / "b", {"COVID": 12, "normal": 12}, size=SIZE, seed=1),
        "c": write_image_folder(tmp_path / "c", {"CT_NonCOVID": 12, "CT_COVID": 12}, size=SIZE, seed=2),
    }


def loso_config(sources: dict[str, Path], root: Path, epochs: int = 2):
    c_map = {"CT_COVID": "COVID", "CT_NonCOVID": "normal"}
    return config_from_dict(
        {
            "name": "loso",
            "output_dir": str(root / "runs"),
            "data": {
                "source": [
                    {"name": name, "path": str(path), **({"label_map": c_map} if name == "c" else {})}
                    for name, path in sources.items()
                ],
                "image_size": SIZE,
                "channels": 1,
                "normalize": "none",
                "split": {"method": "stratified", "ratios": [0.5, 0.25, 0.25], "stratify_by_source": True},
            },
            "model": {"name": "cnn1"},
            "training": {"batch_size": 8, "phases": [{"epochs": epochs, "lr": 0.003}]},
        }
    )


def test_leave_one_source_out_matrix_gap_report_and_resume(sources, tmp_path):
    config = loso_config(sources, tmp_path)
    out = tmp_path / "cv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeakageWarning)  # synthetic images have no patients to group
        with pytest.raises(Interrupted):
            cross_validate(config, out, n_bootstrap=20, callbacks=[StopInFold("b")])
        done_a = (out / "holdout-a" / "crossval.json").stat().st_mtime_ns
        assert not (out / "holdout-b" / "metrics.json").exists()
        with (out / "holdout-b" / "history.csv").open() as handle:
            interrupted = list(csv.DictReader(handle))
        assert len(interrupted) == 1
        report = cross_validate(config, out, n_bootstrap=20)  # the same call again: skip a, resume b, run c
        finished = {path: path.stat().st_mtime_ns for path in out.glob("holdout-*/crossval.json")}
        again = cross_validate(config, out, n_bootstrap=20, callbacks=[NoTraining()])  # all done: trains nothing
    assert {path: path.stat().st_mtime_ns for path in out.glob("holdout-*/crossval.json")} == finished
    assert again.to_dict() == report.to_dict()
    changed = loso_config(sources, tmp_path, epochs=3)
    with pytest.raises(ConfigError, match=r"another config \(it differs in training\.phases\.0\.epochs\)"):
        cross_validate(changed, out, n_bootstrap=20)

    assert (out / "holdout-a" / "crossval.json").stat().st_mtime_ns == done_a  # finished fold not redone
    with (out / "holdout-b" / "history.csv").open() as handle:
        resumed = list(csv.DictReader(handle))
    assert len(resumed) == 2 and resumed[0] == interrupted[0]  # epoch 1 kept, training continued

    assert report.sources == ["a", "b", "c"] and [f.held_out for f in report.folds] == ["a", "b", "c"]
    for fold in report.folds:
        assert set(fold.cells) == {"a", "b", "c"}
        assert [name for name, cell in fold.cells.items() if not cell.in_source] == [fold.held_out]
        assert fold.cells[fold.held_out].n_items == 24  # the held-out source in full
        assert all(cell.n_items == 6 for cell in fold.cells.values() if cell.in_source)  # their test parts
        assert fold.threshold is not None
    without_c = report.folds[2]
    assert without_c.train_sources == ["a", "b"]
    assert without_c.cells["a"].roc_auc.value > 0.8 and without_c.cells["b"].roc_auc.value > 0.8
    assert without_c.cells["c"].roc_auc.value < 0.3  # c's COVID is bright: learned "dark", so inverted
    assert without_c.verdict().startswith("does not transfer: worse than chance")
    inside = [c.roc_auc.value for f in report.folds for c in f.cells.values() if c.in_source]
    outside = [f.cells[f.held_out].roc_auc.value for f in report.folds]
    assert report.gap == pytest.approx(sum(inside) / len(inside) - sum(outside) / len(outside))
    assert report.gap > 0.2
    saved = json.loads((out / "crossval.json").read_text())
    assert saved["gap"] == pytest.approx(report.gap) and saved["folds"][2]["verdict"] == without_c.verdict()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "gap" in html and "held out" in html
    assert "auc_matrix.png" in (out / "report.md").read_text() and (out / "auc_matrix.png").stat().st_size > 0


def test_each_fold_evaluates_its_test_split_once_with_crossvals_options(sources, tmp_path, monkeypatch):
    evaluation = importlib.import_module("covidscan.evaluation.evaluate")  # the module, not the function
    loaded: list[str] = []  # every evaluation loads its model once
    real = evaluation.load_predictor

    def counting(run, *args, **kwargs):
        loaded.append(Path(run).name)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(evaluation, "load_predictor", counting)
    two = {name: sources[name] for name in ("a", "b")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeakageWarning)
        cross_validate(loso_config(two, tmp_path, epochs=1), tmp_path / "cv", n_bootstrap=20, seed=7)
    assert sorted(loaded) == ["holdout-a", "holdout-b"]
    saved = json.loads((tmp_path / "cv" / "holdout-a" / "evaluation" / "test" / "metrics.json").read_text())
    assert (saved["bootstrap"]["n_resamples"], saved["bootstrap"]["seed"]) == (20, 7)


def test_crossval_needs_several_sources_and_no_fixed_test_source(sources, tmp_path, capsys):
    single = config_from_dict({"data": {"source": str(sources["a"])}})
    with pytest.raises(ConfigError, match="two or more sources"):
        cross_validate(single, tmp_path / "x")
    fixed = loso_config(sources, tmp_path)
    fixed.data.test_source = str(sources["c"])
    with pytest.raises(ConfigError, match="remove data.test_source"):
        cross_validate(fixed, tmp_path / "y")
    grouped = loso_config(sources, tmp_path)
    grouped.data.split.method = "grouped"  # the synthetic sources have no patient ids
    with pytest.raises(ConfigError, match="the fold without a trains on b, c, where no sample has a patient id"):
        cross_validate(grouped, tmp_path / "z")
    assert not (tmp_path / "z").exists()  # refused before anything was written
    config = tmp_path / "single.yaml"
    config.write_text(f"data:\n  source: {sources['a']}\n")
    assert main(["crossval", "--config", str(config)]) == 2
    assert "two or more sources" in capsys.readouterr().err
