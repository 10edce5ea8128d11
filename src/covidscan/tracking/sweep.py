"""Hyper-parameter sweeps with Optuna, as study B's random search: each trial is a normal run.

A search space is a YAML mapping from dotted config keys (the ``--set`` keys) to distributions::

    training.phases.0.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    training.batch_size: {type: categorical, choices: [16, 32]}
    model.kwargs.dropout: {type: float, low: 0.2, high: 0.6}

Trials are stored in SQLite (``<output_dir>/sweeps/<study>.db``) and loaded again when the same
study is run again, so an interrupted sweep resumes: ``--trials N`` is the total wanted, not the
number to add. Trial runs live in ``<output_dir>/sweeps/<study>/``, beside ``summary.csv``,
``summary.md`` and ``importance.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from covidscan.config import ConfigError, RunConfig, config_from_dict
from covidscan.errors import UsageError
from covidscan.optional import optional_import
from covidscan.runtime import atomic_path, write_json, write_text
from covidscan.tracking.callbacks import make_trackers
from covidscan.tracking.mlflow import default_tracking_uri
from covidscan.training import train
from covidscan.training.callbacks import Callback

if TYPE_CHECKING:
    from covidscan.training.loop import TrainingLoop

logger = logging.getLogger(__name__)

SAMPLERS = ("random", "tpe")
PRUNERS = ("median", "none")
_DISTRIBUTION_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}
# Trials that count towards ``n_trials``; failed ones are retried by the next run of the study.
_DONE_STATES = ("COMPLETE", "PRUNED")


def parse_search_space(raw: Any, source: str = "search space") -> dict[str, Any]:
    """Turn ``{key: {type: ..., ...}}`` into Optuna distributions, naming the key on any error."""
    distributions = optional_import("optuna.distributions", extra="track")

    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{source}: expected a mapping of dotted config keys to distributions, "
            "e.g. 'training.phases.0.lr: {type: float, low: 1e-4, high: 1e-1, log: true}'"
        )
    space: dict[str, Any] = {}
    for key, spec in raw.items():
        where = f"{source}: {key}"
        if not isinstance(spec, dict) or spec.get("type") not in _DISTRIBUTION_KEYS:
            raise ConfigError(f"{where}: needs 'type' of {sorted(_DISTRIBUTION_KEYS)}, got {spec!r}")
        kind = spec["type"]
        options = {k: v for k, v in spec.items() if k != "type"}
        unknown = sorted(set(options) - _DISTRIBUTION_KEYS[kind])
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {unknown} for type {kind}; allowed: {sorted(_DISTRIBUTION_KEYS[kind])}"
            )
        try:
            if kind == "categorical":
                choices = options.get("choices")
                if not isinstance(choices, list) or not choices:
                    raise ConfigError("'choices' must be a non-empty list")
                space[str(key)] = distributions.CategoricalDistribution(choices)
            elif kind == "float":
                space[str(key)] = distributions.FloatDistribution(
                    float(options["low"]),
                    float(options["high"]),
                    log=bool(options.get("log", False)),
                    step=options.get("step"),
                )
            else:
                space[str(key)] = distributions.IntDistribution(
                    int(options["low"]),
                    int(options["high"]),
                    log=bool(options.get("log", False)),
                    step=int(options.get("step", 1)),
                )
        except KeyError as exc:
            raise ConfigError(f"{where}: type {kind} needs '{exc.args[0]}'") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return space


def load_search_space(path: str | Path) -> dict[str, Any]:
    """Read a search-space YAML file (see the module docstring for its shape)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_search_space(raw, str(path))


def apply_params(config: RunConfig, params: dict[str, Any], **top_level: Any) -> RunConfig:
    """A copy of ``config`` with dotted-key ``params`` (and top-level fields) set, validated again."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in {**top_level, **params}.items()]
    return config_from_dict(config.to_dict(), overrides)


def _suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    distributions = optional_import("optuna.distributions", extra="track")

    params = {}
    for name, dist in space.items():
        if isinstance(dist, distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, distributions.FloatDistribution):
            params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
        else:
            params[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    return params


class TrialCallback(Callback):
    """Links a trainer run to its Optuna trial: records the run directory and reports the
    monitored validation metric each epoch, raising ``TrialPruned`` when the pruner says so."""

    def __init__(self, trial: Any, monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self.trial.set_user_attr("run_dir", str(loop.run_dir))

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        optuna = optional_import("optuna", extra="track")

        epoch = loop.epoch
        if self.monitor not in metrics:
            raise ConfigError(
                f"training.checkpoint_monitor {self.monitor!r} is not logged; available: {sorted(metrics)}"
            )
        value = float(metrics[self.monitor])
        if math.isfinite(value):
            self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.monitor}={value:.4g})")


def best_monitored(history: Sequence[dict[str, float]], monitor: str, mode: Literal["min", "max"]) -> float:
    """The best finite value of ``monitor`` over the epochs (NaN when there is none)."""
    values = [float(row[monitor]) for row in history if monitor in row and math.isfinite(float(row[monitor]))]
    if not values:
        return math.nan
    return min(values) if mode == "min" else max(values)


def _sampler(name: str, seed: int) -> Any:
    optuna = optional_import("optuna", extra="track")

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise UsageError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")


def _pruner(name: str) -> Any:
    optuna = optional_import("optuna", extra="track")

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"pruner must be one of {list(PRUNERS)}, got {name!r}")


@dataclass
class SweepResult:
    """What a sweep produced; ``best_*`` are None until a trial completes."""

    study_name: str
    storage: str
    sweep_dir: Path
    counts: dict[str, int]  # trials per state (COMPLETE, PRUNED, FAIL, RUNNING)
    best_value: float | None
    best_params: dict[str, Any] | None
    best_run_dir: str | None
    summary_csv: Path
    summary_md: Path
    importance_plot: Path | None


def run_sweep(
    config: RunConfig,
    space: dict[str, Any] | str | Path,
    n_trials: int,
    *,
    sampler: str = "random",
    pruner: str = "median",
    storage: str | None = None,
    study_name: str | None = None,
    track: Sequence[str] = (),
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> SweepResult:
    """Run (or resume) a study until it holds ``n_trials`` completed or pruned trials.

    The objective is the best value of ``training.checkpoint_monitor`` over a trial's epochs,
    minimised or maximised as ``training.checkpoint_mode`` says. ``track`` adds MLflow/TensorBoard
    logging to every trial (MLflow runs go to ``experiment``, by default one named after the study).
    """
    optuna = optional_import("optuna", extra="track")

    if n_trials < 1:
        raise UsageError(f"--trials must be >= 1, got {n_trials}")
    if not isinstance(space, dict):
        space = load_search_space(space)
    for key, dist in space.items():  # fail on a bad key now, not after hours of earlier trials
        apply_params(config, {key: _first_value(dist)})
    study_name = study_name or f"{config.name}-sweep"
    sweeps_dir = Path(config.output_dir) / "sweeps"
    sweep_dir = sweeps_dir / study_name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(sweeps_dir / f'{study_name}.db').resolve()}"
    monitor, mode = config.training.checkpoint_monitor, config.training.checkpoint_mode

    # Heartbeats let a resumed sweep mark trials of a killed process as failed instead of running.
    rdb: Any = storage
    if storage.startswith(("sqlite:", "postgresql", "mysql")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=180)
    try:
        stored_before = len(optuna.load_study(study_name=study_name, storage=rdb).trials)
    except KeyError:
        stored_before = 0
    study = optuna.create_study(
        study_name=study_name,
        storage=rdb,
        load_if_exists=True,
        direction="minimize" if mode == "min" else "maximize",
        sampler=_sampler(sampler, config.seed + stored_before),
        pruner=_pruner(pruner),
    )
    study.set_user_attr("monitor", monitor)
    done = _count(study, _DONE_STATES)
    remaining = n_trials - done
    if done:
        logger.info("study %r resumed from %s: %d of %d trials already done", study_name, storage, done, n_trials)
    mlflow_uri = tracking_uri or (default_tracking_uri(config.output_dir) if "mlflow" in track else None)

    def objective(trial: Any) -> float:
        params = _suggest(trial, space)
        trial_config = apply_params(config, params, name=f"trial{trial.number:03d}", output_dir=str(sweep_dir))
        trackers = make_trackers(
            track,
            mlflow_uri,
            experiment=experiment or study_name,
            tags={"sweep.study": study_name, "sweep.trial": str(trial.number)},
        )
        callbacks = [*trackers, TrialCallback(trial, monitor)]  # trackers log an epoch before it may be pruned
        result = train(trial_config, callbacks=callbacks)  # a pruned or failed trial ends its tracked runs
        return best_monitored(result.history, monitor, mode)

    if remaining > 0:
        # A RuntimeError (CUDA out of memory, diverged loss) fails one trial, not the whole sweep.
        study.optimize(objective, n_trials=remaining, catch=(RuntimeError,))
    return summarize_study(study, sweep_dir, storage)


def _first_value(dist: Any) -> Any:
    """A value inside ``dist``, to check that its key exists in the config."""
    choices = getattr(dist, "choices", None)
    return choices[0] if choices is not None else dist.low


def _count(study: Any, states: Sequence[str]) -> int:
    return sum(trial.state.name in states for trial in study.trials)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, each parameter, run directory, seconds."""
    param_names = sorted({name for trial in study.trials for name in trial.params})
    rows = []
    for trial in study.trials:
        seconds = trial.duration.total_seconds() if trial.duration is not None else None
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                **{name: trial.params.get(name) for name in param_names},
                "run_dir": trial.user_attrs.get("run_dir", ""),
                "seconds": None if seconds is None else round(seconds, 1),
            }
        )
    return rows


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(rows: list[dict[str, Any]], csv_path: Path, md_path: Path, *, monitor: str, maximize: bool) -> None:
    """``summary.csv`` (every trial, in order) and ``summary.md`` (completed trials best first)."""
    columns = list(rows[0]) if rows else ["trial", "state", "value", "run_dir", "seconds"]
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def order(row: dict[str, Any]) -> tuple[int, float]:
        value = row["value"]
        if row["state"] != "COMPLETE" or value is None or not math.isfinite(value):
            return (1, 0.0)
        return (0, -value if maximize else value)

    lines = [
        f"Objective: best `{monitor}` per trial ({'higher' if maximize else 'lower'} is better).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_format(row[name]) for name in columns) + " |" for row in sorted(rows, key=order)]
    write_text(md_path, "\n".join(lines) + "\n")


def plot_param_importances(study: Any, path: Path, seed: int = 0) -> Path | None:
    """Bar chart of fANOVA parameter importances; None (with a log line) when there are too few
    completed trials or no parameter varied, as importance is then undefined."""
    optuna = optional_import("optuna", extra="track")

    completed = _count(study, ("COMPLETE",))
    if completed < 2:
        logger.info("parameter importance needs at least 2 completed trials (have %d); no plot", completed)
        return None
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:
        logger.info("parameter importance could not be computed (%s); no plot", exc)
        return None
    if not importances:
        logger.info("no parameter varied across completed trials; no importance plot")
        return None
    from covidscan.plotting import new_figure, save_figure

    names = list(importances)[::-1]  # most important on top
    fig = new_figure(figsize=(8, 0.5 * len(names) + 1.5), layout="tight")
    ax = fig.subplots()
    ax.barh(names, [importances[name] for name in names], color="tab:blue")
    ax.set_xlabel("relative importance (fANOVA)")
    ax.set_title(f"Hyper-parameter importance, {completed} completed trials", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path, dpi=100)
    write_json(path.with_suffix(".json"), importances)
    return path


def summarize_study(study: Any, sweep_dir: Path, storage: str) -> SweepResult:
    """Write the summary table and importance plot of ``study`` into ``sweep_dir``."""
    optuna = optional_import("optuna", extra="track")

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    monitor = study.user_attrs.get("monitor", "value")
    rows = trial_rows(study)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    write_summary(rows, csv_path, md_path, monitor=monitor, maximize=maximize)
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    best = None
    if counts.get("COMPLETE"):
        try:
            best = study.best_trial
        except ValueError:  # every completed value was NaN
            best = None
    return SweepResult(
        study_name=study.study_name,
        storage=storage,
        sweep_dir=sweep_dir,
        counts=counts,
        best_value=None if best is None else best.value,
        best_params=None if best is None else dict(best.params),
        best_run_dir=None if best is None else best.user_attrs.get("run_dir"),
        summary_csv=csv_path,
        summary_md=md_path,
        importance_plot=plot_param_importances(study, sweep_dir / "importance.png"),
    )
