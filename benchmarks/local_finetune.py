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

``--draws N`` repeats the sizes below 100 % with other draws of patients (the spread says how much
one draw's figure can be trusted). Every run gets the same number of optimisation steps: with a
fraction *f* of the training patients both phases run about 1/*f* times the epochs (early stopping on
validation loss still applies). The table starts with the shipped model as is (no local patients),
then gives the covid-ct test split's ROC AUC and F1 (predicted class = the most probable one), each
with a 1,000-resample bootstrap 95% CI; ``learning_curve.png`` plots AUC against training patients.

Results land in ``benchmarks/out/local-finetune/`` (git-ignored), one run directory and one
``results/<run>.json`` per run; finished runs are skipped on a rerun, an interrupted one resumes.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/local_finetune.py            # every run (about 30 min idle)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/local_finetune.py --draws 3    # + two more draws per size
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/local_finetune.py --only imagenet--10 imagenet--10--draw1
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/local_finetune.py --table    # table + plot from finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

import covidscan  # noqa: F401  (installs the torchvision shim first)
from covidscan.config import SplitConfig, config_from_dict
from covidscan.data import load_samples
from covidscan.data.records import SampleSet
from covidscan.data.splits import assign_splits, save_splits
from covidscan.evaluation import evaluate
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
    summarize,
    train_run,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "local-finetune"
SITE = "covid-ct"  # the new hospital
SHIPPED = run_id("plain", "sarscov2-ct")  # the model a site starts from
AS_SHIPPED = "sarscov2-ct--0"  # that model as is, no local patients: where the curve starts
FRACTIONS = (10, 25, 50, 100)  # % of the site's training patients
STARTS = ("imagenet", "sarscov2-ct")
TEST = TestSet(f"{SITE} (test split)", None, {}, True)


def runs(draws: int = 1) -> list[str]:
    """Run ids ``START--PERCENT`` (the first draw of patients) and ``START--PERCENT--drawK`` (another
    draw; none for 100 %, which has one)."""
    return [
        f"{start}--{percent}" + (f"--draw{draw}" if draw else "")
        for draw in range(draws)
        for percent in FRACTIONS
        for start in STARTS
        if not (draw and percent == 100)
    ]


def parse_run(rid: str) -> tuple[str, int, int]:
    start, percent, *draw = rid.split("--")
    return start, int(percent), int(draw[0].removeprefix("draw")) if draw else 0


def known_run(rid: str) -> bool:
    try:
        return rid in runs(parse_run(rid)[2] + 1)
    except ValueError:
        return False


def site_split(settings: Settings) -> SampleSet:
    """The site's split exactly as ``generalization.py``'s plain--covid-ct run draws it."""
    source = SOURCES[SITE]
    samples = load_samples(
        settings.datasets / source.path, label_map=source.label_map, max_per_class=16 if settings.quick else None
    )
    return assign_splits(samples, SplitConfig(method=source.split, ratios=SPLIT_RATIOS), settings.seed)


def manifest(split: SampleSet, percent: int, draw: int, settings: Settings) -> tuple[Path, int, int]:
    """A manifest with ``percent`` % of the training patients (nested within one draw) and every
    val/test row; returns it with the kept training patients and images."""
    train = [s for s in split.samples if s.split == "train"]
    patients = sorted({s.patient_id or s.path for s in train})
    order = np.random.default_rng(settings.seed + draw).permutation(len(patients))
    kept = {patients[i] for i in order[: max(2, math.ceil(len(patients) * percent / 100))]}
    rows = [s for s in split.samples if s.split != "train" or (s.patient_id or s.path) in kept]
    path = settings.out / "manifests" / (f"train-{percent}" + (f"-draw{draw}" if draw else "") + ".csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_splits(SampleSet(rows, split.class_names), path)
    return path, len(kept), sum(1 for s in rows if s.split == "train")


def run_config(rid: str, data: Path, shipped: Path, settings: Settings) -> Any:
    start, percent, _ = parse_run(rid)
    raw = base_config(SITE, settings)
    raw["name"] = rid
    raw["data"].update(source=str(data), label_map={}, split={"method": "predefined"}, max_per_class=None)
    repeat = round(100 / percent)  # the same optimisation steps for every training-set size
    head, full = raw["training"]["phases"]
    head["epochs"] = repeat
    full["epochs"] = repeat * (1 if settings.quick else FULL_EPOCHS[SITE])
    overrides = [f"model.weights={shipped}"] if start == "sarscov2-ct" else []
    return config_from_dict(raw, overrides)


def shipped_model(settings: Settings, source_out: Path) -> Path:
    """The plain sarscov2-ct run of generalization.py, trained there first when missing."""
    source = replace(settings, out=source_out)
    if load_result(source, SHIPPED) is None:
        print(f"== {SHIPPED} (generalization.py, the model a site starts from)", flush=True)
        execute(SHIPPED, source)
    return source_out / "runs" / SHIPPED


def write_record(record: dict[str, Any], settings: Settings) -> dict[str, Any]:
    record.update(date=date.today().isoformat(), commit=commit(), machine=machine())
    path = settings.out / "results" / f"{record['run']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return record


def evaluate_as_shipped(split: SampleSet, shipped: Path, settings: Settings) -> dict[str, Any]:
    """The shipped model without any local patients, on the site's test split (an external set to it)."""
    data = settings.out / "manifests" / "test.csv"
    data.parent.mkdir(parents=True, exist_ok=True)
    save_splits(SampleSet([s for s in split.samples if s.split == "test"], split.class_names), data)
    out = settings.out / "runs" / AS_SHIPPED / "evaluation" / "test"
    report = evaluate(shipped, data, "test", out, {}, settings.bootstrap, external=True).report
    record = {"run": AS_SHIPPED, "start": "sarscov2-ct", "percent": 0, "draw": 0, "train_patients": 0}
    record.update(train_images=0, model=str(shipped), evaluations={TEST.name: summarize(report.to_dict())})
    return write_record(record, settings)


def execute_run(rid: str, split: SampleSet, shipped: Path, settings: Settings) -> dict[str, Any]:
    start, percent, draw = parse_run(rid)
    data, patients, images = manifest(split, percent, draw, settings)
    record: dict[str, Any] = {"run": rid, "start": start, "percent": percent, "draw": draw}
    record.update(train_patients=patients, train_images=images)
    model = settings.out / "runs" / rid
    train_run(run_config(rid, data, shipped, settings), model, record)
    record["evaluations"] = evaluate_all(model, [TEST], settings, tta=False)
    return write_record(record, settings)


def _cell(record: dict[str, Any] | None) -> list[str]:
    if record is None:
        return ["-", "-"]
    test = record["evaluations"][TEST.name]
    return [ci_text(test["roc_auc"]), ci_text(test["f1"])]


def _test_auc(record: dict[str, Any]) -> float:
    return record["evaluations"][TEST.name]["roc_auc"]["value"]


def _draws(records: dict[str, dict[str, Any]], start: str, percent: int) -> list[dict[str, Any]]:
    return [r for r in records.values() if r["start"] == start and r["percent"] == percent]


def _spread(rows: list[dict[str, Any]]) -> str:
    values = [_test_auc(r) for r in rows]
    if len(values) < 2:
        return "-"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f}, {len(values)} draws)"


def markdown(records: dict[str, dict[str, Any]]) -> str:
    """Per training-set size and start: the first draw's AUC and F1 with CIs, and the AUC's mean
    (min-max) over every draw of patients measured."""
    columns = ("AUC [95% CI]", "F1 [95% CI]", "AUC over draws: mean (min-max)")
    header = ["training patients (images)"] + [f"from {start}: {c}" for start in STARTS for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for percent in (0, *FRACTIONS):
        cells = [records.get(f"{start}--{percent}") for start in STARTS]
        some = next((c for c in cells if c), None)
        if some is None:
            continue
        size = f"{percent} %: {some['train_patients']} ({some['train_images']})"
        row = [size if percent else "0 (the sarscov2-ct model as shipped, not fine-tuned)"]
        for start, cell in zip(STARTS, cells):
            row += [*_cell(cell), _spread(_draws(records, start, percent))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(records: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for start, color in zip(STARTS, ("tab:blue", "tab:orange")):
        first = [records[r] for r in (f"{start}--{p}" for p in FRACTIONS) if r in records]
        if not first:
            continue
        x = [r["train_patients"] for r in first]
        auc = [r["evaluations"][TEST.name]["roc_auc"] for r in first]
        axis.fill_between(x, [a["ci_low"] for a in auc], [a["ci_high"] for a in auc], color=color, alpha=0.15)
        means = [np.mean([_test_auc(d) for d in _draws(records, start, r["percent"])]) for r in first]
        axis.plot(x, means, "-", color=color, label=f"from {start} (mean over draws; band: first draw's CI)")
        every = [d for r in first for d in _draws(records, start, r["percent"])]
        axis.plot([d["train_patients"] for d in every], [_test_auc(d) for d in every], "o", color=color, ms=4)
    if AS_SHIPPED in records:
        auc = _test_auc(records[AS_SHIPPED])
        axis.axhline(auc, color="tab:orange", linestyle="--", label=f"sarscov2-ct model as shipped ({auc:.2f})")
    axis.axhline(0.5, color="grey", linestyle=":", label="chance")
    axis.set(xlabel=f"{SITE} training patients", ylabel=f"{SITE} test ROC AUC (95% CI)", ylim=(0.3, 1.0))
    axis.set_title("Fine-tuning at a new site: local labelled data needed")
    axis.set_xscale("log")  # sizes grow geometrically: equal steps on the page
    ticks = sorted({r["train_patients"] for r in records.values()})
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.minorticks_off()
    axis.legend(loc="upper left", fontsize=8)
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
    parser.add_argument("--draws", type=int, default=1, help="draws of training patients per size below 100 %%")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="run just these (START--PERCENT[--drawK])")
    parser.add_argument("--table", action="store_true", help="table and plot of finished runs, then exit")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    out = args.out.with_name(args.out.name + "-quick") if args.quick and args.out == DEFAULT_OUT else args.out
    settings = Settings(args.datasets, out, args.quick, 200 if args.quick else args.bootstrap, 1, args.seed)
    planned = runs(max(args.draws, 1))
    unknown = sorted(rid for rid in args.only or [] if not known_run(rid))
    if unknown:
        parser.error(f"unknown run(s) {unknown}: START--PERCENT[--drawK], START in {STARTS}, PERCENT in {FRACTIONS}")
    if not args.table:
        if not args.datasets.is_dir():
            print(f"{args.datasets}: shared datasets not found; pass --datasets", file=sys.stderr)
            return 2
        source_out = args.source_out or ROOT / "benchmarks" / "out" / (
            "generalization" + ("-quick" if args.quick else "")
        )
        shipped = shipped_model(settings, source_out)
        split = site_split(settings)
        if not (settings.out / "results" / f"{AS_SHIPPED}.json").is_file():
            print(f"== {AS_SHIPPED}", flush=True)
            print("  ", " | ".join(_cell(evaluate_as_shipped(split, shipped, settings))), flush=True)
        for rid in args.only or planned:
            if not (settings.out / "results" / f"{rid}.json").is_file():
                print(f"== {rid}", flush=True)
                record = execute_run(rid, split, shipped, settings)
                print("  ", " | ".join(_cell(record)), flush=True)
    records = {path.stem: json.loads(path.read_text()) for path in sorted((settings.out / "results").glob("*.json"))}
    text = markdown(records)
    (settings.out / "results.md").parent.mkdir(parents=True, exist_ok=True)
    (settings.out / "results.md").write_text(text + "\n")
    if records:
        plot(records, settings.out / "learning_curve.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
