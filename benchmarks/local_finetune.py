"""How many labelled local patients does a new hospital need, and is our CT model a better start than ImageNet?

A model trained on sarscov2-ct scores at chance on covid-ct (``benchmarks/generalization.py``). The
field's answer is to fine-tune on the new site's own labelled data; this measures how much of it it
takes. covid-ct is the "new hospital": its patient-grouped 60/10/30 split is the one
``generalization.py`` draws for ``plain--covid-ct`` (same seed, same function). The validation and
test patients stay fixed; the training patients are cut to 10, 25, 50 and 100 % (nested draws of
whole patients, so every smaller set is inside the larger ones). Each set trains the plain recipe of
``generalization.py`` twice:

- ``imagenet``: from ImageNet MobileNetV2, as a site would without us;
- ``sarscov2-ct``: from the backbone of the ``plain--sarscov2-ct`` run (``model.weights=RUN``; the
  head starts fresh), i.e. "take the shipped CT model and fine-tune it on your data".

Every run gets the same number of optimisation steps: with a fraction *f* of the training patients
both phases run about 1/*f* times the epochs (early stopping on validation loss still applies). The
table gives the covid-ct test split's ROC AUC and F1 (predicted class = the most probable one), each
with a 1,000-resample bootstrap 95% CI; ``learning_curve.png`` plots AUC against training patients.

Results land in ``benchmarks/out/local-finetune/`` (git-ignored), one run directory and one
``results/<run>.json`` per run; finished runs are skipped on a rerun, an interrupted one resumes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/local_finetune.py            # every run (about 30 min idle)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/local_finetune.py --only imagenet--10
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/local_finetune.py --table    # table + plot from finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

import covidscan  # noqa: F401  (installs the torchvision shim first)
from covidscan.config import SplitConfig, config_from_dict
from covidscan.data import load_samples
from covidscan.data.records import SampleSet
from covidscan.data.splits import assign_splits, save_splits
from generalization import (
    DEFAULT_DATASETS,
    FULL_EPOCHS,
    SOURCES,
    SPLIT_RATIOS,
    Settings,
    TestSet,
    base_config,
    ci_text,
    commit,
    evaluate_all,
    execute,
    load_result,
    machine,
    run_id,
    train_run,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "local-finetune"
SITE = "covid-ct"  # the new hospital
SHIPPED = run_id("plain", "sarscov2-ct")  # the model a site starts from
FRACTIONS = (10, 25, 50, 100)  # % of the site's training patients
STARTS = ("imagenet", "sarscov2-ct")
TEST = TestSet(f"{SITE} (test split)", None, {}, True)


def runs() -> list[str]:
    return [f"{start}--{percent}" for percent in FRACTIONS for start in STARTS]


def site_split(settings: Settings) -> SampleSet:
    """The site's split exactly as ``generalization.py``'s plain--covid-ct run draws it."""
    source = SOURCES[SITE]
    samples = load_samples(
        settings.datasets / source.path, label_map=source.label_map, max_per_class=16 if settings.quick else None
    )
    return assign_splits(samples, SplitConfig(method=source.split, ratios=SPLIT_RATIOS), settings.seed)


def manifest(split: SampleSet, percent: int, settings: Settings) -> tuple[Path, int, int]:
    """A manifest with ``percent`` % of the training patients (nested draws) and every val/test row;
    returns it with the kept training patients and images."""
    train = [s for s in split.samples if s.split == "train"]
    patients = sorted({s.patient_id or s.path for s in train})
    order = np.random.default_rng(settings.seed).permutation(len(patients))
    kept = {patients[i] for i in order[: max(2, math.ceil(len(patients) * percent / 100))]}
    rows = [s for s in split.samples if s.split != "train" or (s.patient_id or s.path) in kept]
    path = settings.out / "manifests" / f"train-{percent}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_splits(SampleSet(rows, split.class_names), path)
    return path, len(kept), sum(1 for s in rows if s.split == "train")


def run_config(start: str, percent: int, data: Path, shipped: Path, settings: Settings) -> Any:
    raw = base_config(SITE, settings)
    raw["name"] = f"{start}--{percent}"
    raw["data"].update(source=str(data), label_map={}, split={"method": "predefined"}, max_per_class=None)
    repeat = round(100 / percent)  # the same optimisation steps for every training-set size
    head, full = raw["training"]["phases"]
    head["epochs"] = repeat
    full["epochs"] = repeat * (1 if settings.quick else FULL_EPOCHS[SITE])
    overrides = [f"model.weights={shipped}"] if start == "sarscov2-ct" else []
    return config_from_dict(raw, overrides)


def shipped_model(settings: Settings, source_out: Path) -> Path:
    """The plain sarscov2-ct run of generalization.py, trained there first when missing."""
    source = Settings(
        settings.datasets, source_out, settings.quick, settings.bootstrap, settings.workers, settings.seed
    )
    if load_result(source, SHIPPED) is None:
        print(f"== {SHIPPED} (generalization.py, the model a site starts from)", flush=True)
        execute(SHIPPED, source)
    return source_out / "runs" / SHIPPED


def execute_run(rid: str, split: SampleSet, shipped: Path, settings: Settings) -> dict[str, Any]:
    start, percent = rid.split("--")
    data, patients, images = manifest(split, int(percent), settings)
    record: dict[str, Any] = {"run": rid, "start": start, "percent": int(percent)}
    record.update(train_patients=patients, train_images=images)
    model = settings.out / "runs" / rid
    train_run(run_config(start, int(percent), data, shipped, settings), model, record)
    record["evaluations"] = evaluate_all(model, [TEST], settings, tta=False)
    record["date"] = date.today().isoformat()
    record["commit"] = commit()
    record["machine"] = machine()
    path = settings.out / "results" / f"{rid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return record


def _cell(record: dict[str, Any] | None) -> list[str]:
    if record is None:
        return ["-", "-"]
    test = record["evaluations"][TEST.name]
    return [ci_text(test["roc_auc"]), ci_text(test["f1"])]


def markdown(records: dict[str, dict[str, Any]]) -> str:
    header = ["training patients (images)"] + [
        f"from {start}: {m}" for start in STARTS for m in ("AUC [95% CI]", "F1 [95% CI]")
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for percent in FRACTIONS:
        cells = [records.get(f"{start}--{percent}") for start in STARTS]
        some = next((c for c in cells if c), None)
        if some is None:
            continue
        size = f"{percent} %: {some['train_patients']} ({some['train_images']})"
        lines.append("| " + " | ".join([size] + [x for c in cells for x in _cell(c)]) + " |")
    return "\n".join(lines)


def plot(records: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for start, color in zip(STARTS, ("tab:blue", "tab:orange")):
        rows = [records[r] for r in (f"{start}--{p}" for p in FRACTIONS) if r in records]
        if not rows:
            continue
        x = [r["train_patients"] for r in rows]
        auc = [r["evaluations"][TEST.name]["roc_auc"] for r in rows]
        axis.plot(x, [a["value"] for a in auc], "o-", color=color, label=f"from {start}")
        axis.fill_between(x, [a["ci_low"] for a in auc], [a["ci_high"] for a in auc], color=color, alpha=0.15)
    axis.axhline(0.5, color="grey", linestyle=":", label="chance")
    axis.set(xlabel=f"{SITE} training patients", ylabel=f"{SITE} test ROC AUC (95% CI)", ylim=(0.3, 1.0))
    axis.set_title("Fine-tuning at a new site: local labelled data needed")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS, help="the shared datasets folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--source-out", type=Path, help="generalization.py's results folder holding the shipped sarscov2-ct run"
    )
    parser.add_argument("--quick", action="store_true", help="16 images per class, 64 px, 1 epoch per phase")
    parser.add_argument("--only", nargs="+", metavar="RUN", choices=runs(), help="run just these")
    parser.add_argument("--table", action="store_true", help="table and plot of finished runs, then exit")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    out = args.out.with_name(args.out.name + "-quick") if args.quick and args.out == DEFAULT_OUT else args.out
    settings = Settings(args.datasets, out, args.quick, 200 if args.quick else args.bootstrap, 1, args.seed)
    if not args.table:
        if not args.datasets.is_dir():
            print(f"{args.datasets}: shared datasets not found; pass --datasets", file=sys.stderr)
            return 2
        source_out = args.source_out or ROOT / "benchmarks" / "out" / (
            "generalization" + ("-quick" if args.quick else "")
        )
        shipped = shipped_model(settings, source_out)
        split = site_split(settings)
        for rid in args.only or runs():
            if not (settings.out / "results" / f"{rid}.json").is_file():
                print(f"== {rid}", flush=True)
                record = execute_run(rid, split, shipped, settings)
                print("  ", " | ".join(_cell(record)), flush=True)
    records = {
        rid: json.loads(path.read_text())
        for rid in runs()
        if (path := settings.out / "results" / f"{rid}.json").is_file()
    }
    text = markdown(records)
    (settings.out / "results.md").parent.mkdir(parents=True, exist_ok=True)
    (settings.out / "results.md").write_text(text + "\n")
    if records:
        plot(records, settings.out / "learning_curve.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
