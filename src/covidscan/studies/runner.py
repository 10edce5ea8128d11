"""``run_study``: train every run of a study (resumable), then write its paper-style tables.

Runs live under one study directory (``<out>/runs/<run id>/``), each an ordinary run directory
trained by :func:`covidscan.training.train`. A second call skips finished runs (``metrics.json``
written), resumes an interrupted one from its ``last.pt`` (the trainer's own resume, with its
checks) and starts again a run that died before its first epoch ended. A finished run whose config
no longer matches the study file is an error naming the keys, never silently reused.

Nothing here computes a metric: tables come from :func:`covidscan.evaluation.compare_runs`,
figures from the run's own evaluation, Grad-CAM from :func:`covidscan.explain.explain_files`, the
submission file from :func:`covidscan.serving.predict_files` and the sweep from
:func:`covidscan.tracking.run_sweep`; :mod:`covidscan.studies.report` lays them out.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from covidscan.checkpoint import LAST_NAME
from covidscan.config import ConfigError, RunConfig, config_from_dict, load_config
from covidscan.errors import UsageError
from covidscan.runtime import write_json
from covidscan.studies.spec import RowSpec, StudySpec, expand_grid, load_study
from covidscan.training.resume import check_resumable

logger = logging.getLogger(__name__)

Backbones = Literal["auto", "original", "offline"]
BACKBONES: tuple[str, ...] = ("auto", "original", "offline")
MARKER = "study_run.json"  # in each run directory: which study file entry made it, and how


@dataclass
class PlannedRun:
    """One run of the study, resolved: its config (overrides applied) and its directory."""

    id: str
    label: str
    config_file: Path
    overrides: list[str]
    variant: Literal["original", "offline"]
    config: RunConfig
    run_dir: Path
    phase_checkpoints: bool = False  # a table shows one of its per-phase models


@dataclass
class RunOutcome:
    """What this call did with a run: ``trained``, ``resumed`` or ``skipped`` (finished before)."""

    id: str
    run_dir: Path
    status: Literal["trained", "resumed", "skipped"]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "run_dir": str(self.run_dir), "status": self.status, "seconds": round(self.seconds, 1)}


@dataclass
class StudyContext:
    """Everything the report step needs about the trained study."""

    spec: StudySpec
    out_dir: Path
    quick: bool
    runs: dict[str, PlannedRun]
    outcomes: list[RunOutcome] = field(default_factory=list)
    sweep: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bootstrap(self) -> int:
        return self.spec.quick.bootstrap if self.quick else self.spec.bootstrap


def default_out_dir(spec: StudySpec, quick: bool) -> Path:
    """``runs/studies/<name>`` (``-quick`` for smoke runs, which never mix with full ones)."""
    return Path("runs") / "studies" / (f"{spec.name}-quick" if quick else spec.name)


def _quick_overrides(spec: StudySpec, config: RunConfig) -> list[str]:
    quick = spec.quick
    overrides = [f"data.max_per_class={quick.max_per_class}", f"data.image_size={quick.image_size}"]
    overrides += [f"training.phases.{i}.epochs={quick.epochs}" for i in range(len(config.training.phases))]
    return overrides + list(quick.overrides)


def _marker(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete {run_dir} to train that run again") from exc


def _original_weights_load(config: RunConfig) -> bool:
    """Can the original config's pretrained backbone be built here (offline)? Builds it once."""
    from covidscan.models import PretrainedWeightsError, create_model_from_config

    try:
        create_model_from_config(config, num_classes=2)
    except PretrainedWeightsError as exc:
        logger.info("original backbone unavailable (%s)", str(exc).split(".")[0])
        return False
    return True


def _phase_checkpoint_runs(spec: StudySpec) -> set[str]:
    return {row.run for table in spec.tables for row in table.rows if isinstance(row, RowSpec) and row.checkpoint}


def plan_runs(
    spec: StudySpec,
    out_dir: Path,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    backbones: Backbones = "auto",
) -> dict[str, PlannedRun]:
    """Every run of ``spec`` with its resolved config, in study-file order (grids expanded).

    Override order: the study's, the run's, the grid's, ``--quick``'s, then ``overrides`` (the
    caller's ``--set``). ``backbones``: ``original`` configs, their ``offline`` variants, or
    ``auto`` (the original when its ImageNet weights load here, else the offline variant). A run
    already started keeps the variant it was started with.
    """
    if backbones not in BACKBONES:
        raise UsageError(f"backbones must be one of {list(BACKBONES)}, got {backbones!r}")
    phased = _phase_checkpoint_runs(spec)
    planned: dict[str, PlannedRun] = {}
    for run in spec.runs:
        for run_id, grid_overrides in expand_grid(run, spec.quick.grid if quick else None):
            run_dir = out_dir / "runs" / run_id
            base = [*spec.overrides, *run.overrides, *grid_overrides]
            marker = _marker(run_dir)
            variant: Literal["original", "offline"] = "original"
            if run.offline is not None:
                if marker is not None:
                    variant = marker["variant"]
                elif backbones == "offline":
                    variant = "offline"
                elif backbones == "auto":
                    probe = load_config(spec.folder / run.config, [*base, *overrides])
                    variant = "original" if _original_weights_load(probe) else "offline"
            config_file = spec.folder / (run.offline if variant == "offline" and run.offline else run.config)
            unquick = load_config(config_file, base)
            extra = _quick_overrides(spec, unquick) if quick else []
            final = [*base, *extra, f"name={spec.name}-{run_id}", f"output_dir={out_dir / 'runs'}", *overrides]
            planned[run_id] = PlannedRun(
                id=run_id,
                label=run.label.replace("{id}", run_id) if run.label else run_id,
                config_file=config_file,
                overrides=final,
                variant=variant,
                config=load_config(config_file, final),
                run_dir=run_dir,
                phase_checkpoints=run_id in phased,
            )
    return planned


def _check_finished(run: PlannedRun) -> None:
    """A finished run is reused only when the study would train the same thing today."""
    saved = load_config(run.run_dir / "config.yaml")
    phases = len(saved.training.phases)
    try:
        check_resumable(saved, run.config, phases, run.run_dir)
        before = [p.epochs for p in saved.training.phases]
        after = [p.epochs for p in run.config.training.phases]
        if before != after:
            raise ConfigError(f"training epochs per phase were {before} but are now {after}")
    except ConfigError as exc:
        raise ConfigError(
            f"run {run.id} in {run.run_dir} finished with another config than the study file now gives ({exc}); "
            f"delete {run.run_dir} to train it again, or use another --out"
        ) from exc


def run_state(run_dir: Path) -> Literal["new", "finished", "interrupted"]:
    """``finished``: ``metrics.json`` written at the end of training; ``interrupted``: an epoch was
    saved (``last.pt``) but training did not end; ``new``: nothing worth keeping."""
    if (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / LAST_NAME).is_file():
        return "finished"
    if (run_dir / "checkpoints" / LAST_NAME).is_file():
        return "interrupted"
    return "new"


def train_run(run: PlannedRun, spec: StudySpec) -> RunOutcome:
    """Train, resume or skip one run (see the module docstring)."""
    from covidscan.training import PhaseCheckpoints, train

    state = run_state(run.run_dir)
    started = time.perf_counter()
    if state == "finished":
        _check_finished(run)
        logger.info("study %s: run %s finished before, skipped", spec.name, run.id)
        return RunOutcome(run.id, run.run_dir, "skipped", 0.0)
    callbacks = [PhaseCheckpoints()] if run.phase_checkpoints else []
    if state == "new":
        if run.run_dir.exists():  # died before its first epoch ended: nothing to resume
            logger.info("run %s: removing %s (interrupted before its first epoch ended)", run.id, run.run_dir)
            shutil.rmtree(run.run_dir)
        run.run_dir.mkdir(parents=True)
        write_json(
            run.run_dir / MARKER,
            {
                "study": spec.name,
                "study_file": spec.path,
                "run": run.id,
                "config_file": str(run.config_file),
                "variant": run.variant,
                "overrides": run.overrides,
            },
        )
    logger.info("study %s: %s run %s (%s)", spec.name, "training" if state == "new" else "resuming", run.id, run.label)
    train(run.config, run_dir=run.run_dir, callbacks=callbacks, resume=state == "interrupted")
    status: Literal["trained", "resumed"] = "trained" if state == "new" else "resumed"
    return RunOutcome(run.id, run.run_dir, status, time.perf_counter() - started)


def run_sweep_of(context: StudyContext) -> None:
    """Study B's random search (resumable: Optuna's storage under the study directory)."""
    from covidscan.tracking.sweep import run_sweep

    spec, sweep = context.spec, context.spec.sweep
    assert sweep is not None
    base = context.runs[sweep.run]
    config = config_from_dict(base.config.to_dict(), [f"output_dir={context.out_dir}"])
    trials = sweep.quick_trials if context.quick else sweep.trials
    result = run_sweep(
        config,
        spec.resolve(sweep.space),
        trials,
        sampler=sweep.sampler,
        pruner=sweep.pruner,
        study_name=f"{spec.name}-{sweep.id}",
    )
    context.sweep = {
        "id": sweep.id,
        "base_run": sweep.run,
        "space": str(spec.resolve(sweep.space)),
        "trials": trials,
        "sampler": sweep.sampler,
        "pruner": sweep.pruner,
        "counts": result.counts,
        "monitor": config.training.checkpoint_monitor,
        "best_value": result.best_value,
        "best_params": result.best_params,
        "best_run_dir": result.best_run_dir,
        "summary": str(result.summary_md),
    }
    if result.best_run_dir is None:
        context.notes.append(f"the sweep {sweep.id} has no completed trial yet; its row is left out")
        return
    best_dir = Path(result.best_run_dir)
    label = sweep.label or f"{base.label}, best of {trials} random-sweep trials"
    context.runs[sweep.id] = PlannedRun(
        sweep.id,
        label,
        base.config_file,
        [*base.overrides],
        base.variant,
        load_config(best_dir / "config.yaml"),
        best_dir,
    )


def run_study(
    study: str | Path | StudySpec,
    out_dir: str | Path | None = None,
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    backbones: Backbones = "auto",
    unlabeled: str | Path | None = None,
    train_only: bool = False,
) -> Any:
    """Train every run of ``study`` (a study file, a name under ``configs/studies/``, or a loaded
    spec) and write its report; return the :class:`~covidscan.studies.report.StudyReport`.

    ``out_dir`` defaults to ``runs/studies/<name>`` (``<name>-quick`` with ``quick``). ``quick``
    trains on ``quick.max_per_class`` images per class at ``quick.image_size`` for
    ``quick.epochs`` per phase (and ``quick.grid``'s subset of a grid). ``overrides`` (``--set``)
    apply to every run, after the study's own. ``unlabeled`` replaces the study file's folder for
    the submission file. ``train_only`` stops after training (no tables).
    """
    spec = study if isinstance(study, StudySpec) else load_study(study)
    if unlabeled is not None and not Path(unlabeled).is_dir():
        raise FileNotFoundError(f"{unlabeled}: no such folder of unlabeled images (--unlabeled)")
    out = Path(out_dir) if out_dir is not None else default_out_dir(spec, quick)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(spec, out, quick=quick, overrides=overrides, backbones=backbones)
    context = StudyContext(spec, out, quick, runs)
    for index, run in enumerate(list(runs.values()), start=1):
        logger.info("study %s: run %d/%d %s", spec.name, index, len(runs), run.id)
        context.outcomes.append(train_run(run, spec))
    if spec.sweep is not None:
        run_sweep_of(context)
    if train_only:
        return None
    from covidscan.studies.report import build_report

    return build_report(context, unlabeled=Path(unlabeled) if unlabeled is not None else None)
