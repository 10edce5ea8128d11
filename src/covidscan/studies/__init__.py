"""Whole studies in one command: a study file lists its runs and its paper tables; ``run_study``
trains every run (resumable) and writes the tables with CIs, tests and the published numbers."""

from covidscan.studies.runner import BACKBONES, PlannedRun, RunOutcome, default_out_dir, plan_runs, run_state, run_study
from covidscan.studies.spec import RowSpec, RunSpec, StudySpec, TableSpec, list_studies, load_study

__all__ = [
    "BACKBONES",
    "PlannedRun",
    "RowSpec",
    "RunOutcome",
    "RunSpec",
    "StudySpec",
    "TableSpec",
    "default_out_dir",
    "list_studies",
    "load_study",
    "plan_runs",
    "run_state",
    "run_study",
]
