"""Optuna sweeps: search spaces, resuming an interrupted study, pruning, summary and importance."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

import covidscan.tracking.sweep as sweep_module
from covidscan.config import ConfigError, RunConfig, load_config
from covidscan.tracking import TrialCallback, list_runs, parse_search_space, run_sweep
from covidscan.tracking.sweep import load_search_space, plot_param_importances

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "training.phases.0.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "training.batch_size": {"type": "categorical", "choices": [4, 8]},
    "model.kwargs.dropout": {"type": "float", "low": 0.2, "high": 0.6},
}


def tiny_config(output_dir: Path) -> RunConfig:
    """The demo config shrunk to a few seconds per trial: 32 px, 8 images per class, 1 epoch."""
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [
            f"output_dir={output_dir}",
            "data.image_size=32",
            "data.max_per_class=8",
            "data.split.ratios=[0.6, 0.4, 0.0]",
            "training.phases.0.epochs=1",
        ],
    )


def test_interrupted_sweep_resumes_up_to_the_total(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    first = run_sweep(config, parse_search_space(SPACE), 2, study_name="s")
    assert first.counts == {"COMPLETE": 2}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, parse_search_space(SPACE), 3, study_name="s")
    monkeypatch.undo()

    result = run_sweep(config, parse_search_space(SPACE), 3, study_name="s")
    assert result.counts == {"COMPLETE": 3, "FAIL": 1}  # 3 in total, not 2 + 3; the interrupted one failed
    assert result.storage == f"sqlite:///{(tmp_path / 'sweeps' / 's.db').resolve()}"
    with result.summary_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["state"] for row in rows] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert len({row["training.phases.0.lr"] for row in rows}) == 4  # a resumed sampler draws new values
    completed = [row for row in rows if row["state"] == "COMPLETE"]
    assert all(Path(row["run_dir"], "history.csv").is_file() for row in completed)
    assert result.best_value == min(float(row["value"]) for row in completed)  # val_loss is minimised
    assert result.best_run_dir in {row["run_dir"] for row in completed}
    assert "| trial |" in result.summary_md.read_text()
    assert result.importance_plot is not None and result.importance_plot.is_file()
    # every trial is a normal run directory that `runs list` finds
    assert sorted(run.status for run in list_runs(result.sweep_dir)) == ["complete"] * 3


def test_a_bad_space_key_fails_before_any_trial(tmp_path):
    space = parse_search_space({"training.batchsize": {"type": "categorical", "choices": [8]}})
    with pytest.raises(ConfigError, match="batchsize"):
        run_sweep(tiny_config(tmp_path), space, 1)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"type": "uniform", "low": 0, "high": 1}, "needs 'type'"),
        ({"type": "float", "low": 0.1}, "needs 'high'"),
        ({"type": "float", "low": 1.0, "high": 0.1}, "low"),
        ({"type": "int", "low": 1, "high": 4, "choices": [1]}, "unknown field"),
        ({"type": "categorical", "choices": []}, "non-empty"),
    ],
)
def test_invalid_distributions_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_search_space({"training.phases.0.lr": spec}, "space.yaml")
    assert "space.yaml: training.phases.0.lr" in str(error.value)


def test_study_b_space_file_is_valid_for_the_config():
    space = load_search_space(ROOT / "configs" / "sweeps" / "study_b_random.yaml")
    assert set(space) == {
        "training.phases.0.lr",
        "training.batch_size",
        "training.phases.0.scheduler.decay_rate",
        "model.kwargs.dropout",
    }
    low_values = {key: getattr(dist, "low", None) or dist.choices[0] for key, dist in space.items()}
    config = sweep_module.apply_params(load_config(ROOT / "configs" / "study_b_sepconv.yaml"), low_values)
    assert config.training.phases[0].lr == pytest.approx(1e-4)
    assert config.model.kwargs["dropout"] == pytest.approx(0.2)


class _FakeTrial:
    def __init__(self, prune: bool) -> None:
        self.prune, self.reports, self.user_attrs = prune, [], {}

    def report(self, value: float, step: int) -> None:
        self.reports.append((step, value))

    def should_prune(self) -> bool:
        return self.prune

    def set_user_attr(self, key: str, value: str) -> None:
        self.user_attrs[key] = value


def test_trial_callback_reports_the_monitor_and_prunes(tmp_path):
    keep, prune = _FakeTrial(prune=False), _FakeTrial(prune=True)
    loop = SimpleNamespace(run_dir=tmp_path, config=RunConfig(), epoch=1)  # what the hooks read of the loop
    TrialCallback(keep, "val_loss").on_fit_start(loop)
    TrialCallback(keep, "val_loss").on_epoch_end(loop, {"loss": 0.6, "val_loss": 0.5})
    assert keep.reports == [(1, 0.5)] and keep.user_attrs == {"run_dir": str(tmp_path)}
    with pytest.raises(optuna.TrialPruned):
        TrialCallback(prune, "val_loss").on_epoch_end(SimpleNamespace(epoch=2), {"val_loss": 0.9})
    with pytest.raises(ConfigError, match="val_auc"):
        TrialCallback(keep, "val_auc").on_epoch_end(loop, {"val_loss": 0.5})


def _study_with(values: list[tuple[float, float]]) -> optuna.Study:
    """An in-memory study whose objective is ``x`` (``y`` is noise)."""
    study = optuna.create_study()
    dist = optuna.distributions.FloatDistribution(0, 1)
    for x, y in values:
        study.add_trial(
            optuna.trial.create_trial(params={"x": x, "y": y}, distributions={"x": dist, "y": dist}, value=x)
        )
    return study


def test_importance_plot_ranks_the_parameter_that_matters(tmp_path):
    study = _study_with([(0.1, 0.5), (0.9, 0.4), (0.5, 0.6), (0.3, 0.5), (0.7, 0.5), (0.2, 0.4)])
    path = plot_param_importances(study, tmp_path / "importance.png")
    assert path is not None and path.is_file()
    importances = json.loads(path.with_suffix(".json").read_text())
    assert importances["x"] > importances["y"]


def test_importance_plot_is_skipped_with_too_few_trials(tmp_path):
    assert plot_param_importances(_study_with([(0.1, 0.5)]), tmp_path / "importance.png") is None
    assert not (tmp_path / "importance.png").exists()
