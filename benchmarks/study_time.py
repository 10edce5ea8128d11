"""How long a study takes on this machine: its ``--quick`` run, measured, and its full protocol,
extrapolated from measured epoch times.

``--quick`` times ``covidscan study run STUDY --quick`` end to end (training, tables, figures).
Without it, every run of the study trains one epoch per phase on a capped subset
(``--per-class`` items per class) at its full input size, model and batch size; the epoch time
(training + validation) is scaled by the full split's items per epoch over the subset's and
multiplied by the configured epochs of each phase. That is an upper bound: early stopping may end a
phase sooner, and the tables' evaluations and Grad-CAM maps are not counted (they take minutes, not
hours). Study B's sweep counts each trial at the full time of the run it sweeps.

Run it under the shared lock, one study at a time (each call stays well under 10 minutes on 2
cores with the defaults; ``--runs`` picks some runs of a large study such as C):

    flock /tmp/covidscan-heavy.lock .venv/bin/python benchmarks/study_time.py E --quick
    flock /tmp/covidscan-heavy.lock .venv/bin/python benchmarks/study_time.py E --per-class 16
    flock /tmp/covidscan-heavy.lock .venv/bin/python benchmarks/study_time.py C --runs 'resnet3d_18-d16-b8'

It prints a markdown table with the machine, date and command, for benchmarks/README.md and
docs/studies.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sized
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import torch

import covidscan  # noqa: F401  (compat shim before torchvision)
from covidscan.config import RunConfig, config_from_dict
from covidscan.data import build_dataset
from covidscan.studies import load_study, plan_runs, run_study
from covidscan.studies.runner import PlannedRun
from covidscan.training import train
from covidscan.training.data import load_run_splits


def items_per_epoch(config: RunConfig) -> int:
    """Training + validation items one epoch of ``config`` goes through: images for 2D data, slice
    stacks for 3D data (counted by the volume dataset, which reads only the scans' headers)."""
    splits = load_run_splits(config)
    total = 0
    for split, is_train in (("train", True), ("val", False)):
        samples = splits.subset(split).samples
        if config.data.spatial_dims == 2:
            total += len(samples)
        else:
            total += len(cast(Sized, build_dataset(config.data, samples, splits.class_names, train=is_train)))
    return total


def measure_run(run: PlannedRun, per_class: int, work: Path) -> dict[str, object]:
    """One epoch per phase on the capped subset, extrapolated to the run's full protocol."""
    phases = run.config.training.phases
    subset = config_from_dict(
        run.config.to_dict(),
        [f"data.max_per_class={per_class}", *[f"training.phases.{i}.epochs=1" for i in range(len(phases))]],
    )
    full_items, subset_items = items_per_epoch(run.config), items_per_epoch(subset)
    result = train(subset, run_dir=work / run.id)
    epoch_seconds = [float(row["seconds"]) for row in result.history]
    scale = full_items / subset_items
    full_seconds = sum(phase.epochs * seconds * scale for phase, seconds in zip(phases, epoch_seconds))
    return {
        "run": run.id,
        "model": run.config.model.name,
        "input": run.config.data.image_size,
        "depth": run.config.data.depth if run.config.data.spatial_dims == 3 else None,
        "batch": run.config.training.batch_size,
        "full_items": full_items,
        "subset_items": subset_items,
        "epoch_seconds": epoch_seconds,
        "epochs": [phase.epochs for phase in phases],
        "full_seconds": full_seconds,
    }


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def header(command: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"device cpu; {now}; command: `{command}`"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="A..E or a study file")
    parser.add_argument("--quick", action="store_true", help="time `covidscan study run STUDY --quick` instead")
    parser.add_argument("--per-class", type=int, default=16, help="items per class of the measured subset")
    parser.add_argument("--runs", default="*", help="glob over run ids (default: all)")
    parser.add_argument("--out", help="working directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    command = "python benchmarks/study_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    spec = load_study(args.study)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        print(header(command))
        if args.quick:
            started = time.perf_counter()
            report = run_study(spec, work / "quick", quick=True)
            seconds = time.perf_counter() - started
            print(
                f"\n{spec.name} --quick: {seconds:.0f} s wall for {len(report.runs)} runs, {len(report.tables)} tables"
            )
            return 0
        planned = [run for run_id, run in plan_runs(spec, work / "plan").items() if fnmatch.fnmatch(run_id, args.runs)]
        rows = [measure_run(run, args.per_class, work / "runs") for run in planned]
        print(
            "\n| run | model | input | batch | items/epoch (full) | measured s/epoch per phase "
            f"({args.per_class}/class) | epochs | full run, extrapolated |"
        )
        print("|---|---|---|---|---|---|---|---|")
        total = 0.0
        for row in rows:
            seconds = cast(float, row["full_seconds"])
            total += seconds
            size = f"{row['input']}" + (f" x {row['depth']} slices" if row["depth"] else "")
            measured = ", ".join(f"{s:.1f}" for s in cast(list[float], row["epoch_seconds"]))
            epochs = " + ".join(str(e) for e in cast(list[int], row["epochs"]))
            print(
                f"| {row['run']} | {row['model']} | {size} | {row['batch']} | {row['full_items']} | "
                f"{measured} ({row['subset_items']} items) | {epochs} | {_hours(seconds)} |"
            )
        if spec.sweep is not None and any(row["run"] == spec.sweep.run for row in rows):
            swept = next(cast(float, row["full_seconds"]) for row in rows if row["run"] == spec.sweep.run)
            total += spec.sweep.trials * swept
            trials = f"{spec.sweep.trials} trials of {spec.sweep.run}"
            print(f"| {spec.sweep.id} | {trials} | | | | | | {_hours(spec.sweep.trials * swept)} |")
        print(f"\ntotal, extrapolated (upper bound: early stopping may end phases sooner): {_hours(total)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
