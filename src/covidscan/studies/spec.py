"""Study files: what a study trains (its runs) and what it reports (its tables), read from YAML.

A study file (``configs/studies/study_*.yaml``) names run configs and the overrides that make each
run of the study (study C's depth x batch-size grid is one entry with a ``grid``), the tables the
paper printed (which runs are rows, which metrics, which split, the published numbers) and the
extras a study needs (study B's random sweep, study A's submission file, study D's Grad-CAM maps).
It is validated like a run config (:func:`covidscan.config.build_from_plain`): an unknown key or a
wrong value fails before anything trains, naming the key. Paths are relative to the study file.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from covidscan.config import ConfigError, build_from_plain
from covidscan.evaluation.metrics import METRIC_LABELS

STUDIES_DIR = Path("configs") / "studies"  # where `covidscan study run A` looks, from the project root
FIGURES = ("confusion", "grid", "gradcam", "history")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class RunSpec:
    """One run (or, with ``grid``, one run per combination of the grid's values).

    ``id`` names the run directory; with a grid it holds ``{key}`` placeholders, e.g.
    ``d{data.depth}-b{training.batch_size}``. ``offline``: a variant config whose ImageNet backbone
    loads offline, used when the original's weights cannot be loaded (see ``run_study(backbones=)``).
    """

    id: str
    config: str
    label: str | None = None
    overrides: list[str] = field(default_factory=list)
    offline: str | None = None
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.id) and "/" not in self.id, f"runs: id {self.id!r} must be a non-empty name without '/'")
        for key, values in self.grid.items():
            _check(isinstance(values, list) and bool(values), f"runs.{self.id}.grid.{key} must be a non-empty list")
            _check("{" + key + "}" in self.id, f"runs.{self.id}: a grid over {key} needs '{{{key}}}' in the id")


@dataclass
class RowSpec:
    """A table row: a run (``run``: its id), optionally one of its per-phase checkpoints
    (``checkpoint: phase-1``: the best epoch of phase 1, study E's "initial" model), and the
    published numbers to print beside ours."""

    run: str
    label: str | None = None
    checkpoint: str | None = None
    published: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            self.checkpoint is None or (self.checkpoint.startswith("phase-") and self.checkpoint[6:].isdigit()),
            f"table row {self.run}: checkpoint must be 'phase-N' (the best epoch of phase N), got {self.checkpoint!r}",
        )
        for name in self.published:
            _check(
                name in METRIC_LABELS,
                f"table row {self.run}: published metric {name!r} is not one of {list(METRIC_LABELS)}",
            )

    @property
    def key(self) -> str:
        """Unique within a table: the run id, plus the checkpoint when it is not the best one."""
        return f"{self.run}@{self.checkpoint}" if self.checkpoint else self.run


@dataclass
class TableSpec:
    """A paper table: rows (run ids, glob patterns over them, or :class:`RowSpec` mappings), the
    metrics (``covidscan.evaluation`` names) with 95% CIs, Fisher-test stars of each row against
    the first, and ``columns`` that show a config value per row (header -> dotted config key)."""

    id: str
    title: str
    rows: list[str | RowSpec]
    metrics: list[str]
    split: str = "test"
    level: Literal["auto", "item", "patient"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    runtime: bool = False  # training runtime and parameter count per row (study B's Table 3.1)
    figures: list[str] = field(default_factory=list)  # per row: confusion, grid, gradcam, history
    note: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.rows), f"tables.{self.id}.rows must name at least one run")
        unknown = [m for m in self.metrics if m not in METRIC_LABELS]
        _check(not unknown, f"tables.{self.id}.metrics: {unknown} not among {list(METRIC_LABELS)}")
        _check(bool(self.metrics), f"tables.{self.id}.metrics must name at least one metric")
        bad = [f for f in self.figures if f not in FIGURES]
        _check(not bad, f"tables.{self.id}.figures: {bad} not among {list(FIGURES)}")


@dataclass
class SweepSpec:
    """Study B's random hyper-parameter search over one run's config (``covidscan sweep``); its
    best trial becomes the run ``id`` that tables can show as a row."""

    id: str
    run: str
    space: str
    trials: int
    quick_trials: int = 2
    sampler: Literal["random", "tpe"] = "random"
    pruner: Literal["median", "none"] = "median"
    label: str | None = None

    def __post_init__(self) -> None:
        _check(self.trials >= 1 and self.quick_trials >= 1, "sweep.trials and sweep.quick_trials must be >= 1")


@dataclass
class SubmissionSpec:
    """Study A's submission file: the best row of ``table`` (by ``metric``) predicts every image of
    an unlabeled folder (``covidscan predict``)."""

    input: str
    table: str
    metric: str = "accuracy"
    quick_images: int = 16  # --quick predicts only this many files


@dataclass
class GradCamSpec:
    """Grad-CAM maps (``covidscan explain``) for the first ``images`` test items of each row."""

    images: int = 4
    method: Literal["gradcam", "gradcampp", "smoothgradcampp"] = "gradcam"


@dataclass
class QuickSpec:
    """``--quick``: a smoke run of the whole protocol on a subset, fast enough for a test."""

    max_per_class: int = 8
    image_size: int = 32
    epochs: int = 1  # per phase
    bootstrap: int = 200
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # a subset of each grid's values


@dataclass
class StudySpec:
    """A whole study file; ``path`` is set by :func:`load_study`."""

    name: str
    title: str
    summary: str
    runs: list[RunSpec]
    tables: list[TableSpec]
    substitutions: list[str] = field(default_factory=list)
    published_source: str | None = None
    overrides: list[str] = field(default_factory=list)  # for every run
    sweep: SweepSpec | None = None
    submission: SubmissionSpec | None = None
    gradcam: GradCamSpec = field(default_factory=GradCamSpec)
    quick: QuickSpec = field(default_factory=QuickSpec)
    bootstrap: int = 1000
    path: str = ""

    def __post_init__(self) -> None:
        templates = [run.id for run in self.runs]
        _check(len(set(templates)) == len(templates), f"study {self.name}: run ids must be unique, got {templates}")
        ids = {run_id for spec in self.runs for run_id, _ in expand_grid(spec)}
        if self.sweep is not None:
            _check(self.sweep.run in ids, f"sweep.run {self.sweep.run!r} is not a run id of study {self.name}")
            ids.add(self.sweep.id)
        for table in self.tables:
            for row in table.rows:
                pattern = row if isinstance(row, str) else row.run
                _check(
                    any(fnmatch.fnmatchcase(i, pattern) for i in ids),
                    f"tables.{table.id}: row {pattern!r} matches no run id of study {self.name} ({sorted(ids)})",
                )
        table_ids = [t.id for t in self.tables]
        _check(len(set(table_ids)) == len(table_ids), f"study {self.name}: table ids must be unique")
        if self.submission is not None:
            _check(self.submission.table in table_ids, f"submission.table {self.submission.table!r} is not a table id")

    @property
    def folder(self) -> Path:
        return Path(self.path).parent

    def resolve(self, relative: str) -> Path:
        """A path from the study file: as written when it exists from the working directory (the
        project root), else relative to the study file's folder (as run configs resolve data paths)."""
        path = Path(relative)
        if path.is_absolute() or path.exists():
            return path
        return self.folder / path


def expand_grid(spec: RunSpec, subset: dict[str, list[Any]] | None = None) -> list[tuple[str, list[str]]]:
    """``(run id, overrides)`` for every combination of ``spec.grid`` (one entry without a grid);
    ``subset`` keeps only the listed values of a grid key (``--quick``)."""
    if not spec.grid:
        return [(spec.id, [])]
    keys = list(spec.grid)
    values = [[v for v in spec.grid[k] if not subset or k not in subset or v in subset[k]] for k in keys]
    runs = []
    for combination in itertools.product(*values):
        run_id = spec.id
        for key, value in zip(keys, combination):
            run_id = run_id.replace("{" + key + "}", str(value))
        runs.append(
            (
                run_id,
                [
                    f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
                    for key, value in zip(keys, combination)
                ],
            )
        )
    return runs


def study_path(study: str | Path) -> Path:
    """A study file path, or a study's name (``A``, ``study_a``) under ``configs/studies/``."""
    path = Path(study)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"study file not found: {path}")
        return path
    name = str(study).lower()
    candidate = STUDIES_DIR / f"{name if name.startswith('study_') else 'study_' + name}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in STUDIES_DIR.glob("*.yaml")) if STUDIES_DIR.is_dir() else []
        raise ConfigError(
            f"no study {study!r}: {candidate} does not exist (run from the project root; studies there: "
            f"{known or 'none'}), or give the path of a study file"
        )
    return candidate


def load_study(study: str | Path) -> StudySpec:
    """Read and validate a study file (a path, or a name under ``configs/studies/``)."""
    path = study_path(study)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    _check(isinstance(raw, dict), f"{path} must contain a mapping at the top level")
    try:
        spec: StudySpec = build_from_plain(StudySpec, {**raw, "path": str(path)})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return spec


def list_studies() -> list[Path]:
    """The study files shipped under ``configs/studies/`` (from the project root)."""
    return sorted(STUDIES_DIR.glob("study_*.yaml")) if STUDIES_DIR.is_dir() else []
