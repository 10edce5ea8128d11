"""Does a CT model hold up at another hospital? Leave-one-source-out ROC AUC for each robustness lever.

Issue #12 item 8. Two CT sources train and test in turn, a third is a tiny external test set only:

- ``sarscov2-ct`` (Sao Paulo hospitals; 2,481 JPEG slices, **no patient ids**: its random 60/10/30
  split puts slices of one patient in train and test, so its in-source figures are optimistic);
- ``covid-ct`` (slices cut from medRxiv/bioRxiv figures; 746 images, 384 patients; patient-grouped
  60/10/30 split; labels ``COVID`` / ``NonCOVID`` -> ``non-COVID``);
- ``covid-ct-md-sample`` (6 patients' DICOM series, every slice rendered through the lung window;
  ``COVID-19`` -> ``COVID``, ``CAP`` and ``Normal`` -> ``non-COVID``): external only, far too small to
  train on, so its CIs are wide (patients resampled).

Every recipe trains once per training set (sarscov2-ct alone, covid-ct alone; the multi-source
recipes on both) with the product's own API, :func:`covidscan.training.train`, and is evaluated by
:func:`covidscan.evaluation.evaluate`: on the training set's own test split (in-source) and on every
source it never saw, in full (external): ROC AUC with a 1,000-resample bootstrap 95% CI, and
sensitivity / specificity at the threshold chosen on the run's own validation split (Youden's J).

The plain recipe is today's best CPU recipe (``benchmarks/study_e.py``): ImageNet MobileNetV2 with
study E's head, one head-only epoch then all layers, 224 px, study E's light augmentation. Each
lever changes one thing (the ``--set`` overrides are printed with the table): lung crop / mask
(``data.lung``), robust augmentation + CLAHE (``data.augment.preset: robust``, ``data.intensity``),
the backbone (EfficientNet-Lite0/1), test-time augmentation (``tta``), an ensemble of the three
backbones (``covidscan.inference.make_ensemble``), training on both sources. ``harmonized`` turns on
every source-invariance lever at once (lung mask, CLAHE, robust augmentation); ``long`` spends more
compute (224 px, about twice the epochs, cosine decay) to see how far the in-source figures move
(``long-mask``: with the lung mask);
``ensemble-top3`` averages the three trained recipes with the best validation AUC; ``long-x5`` is a deep
ensemble: ``long`` trained with four more seeds on the ``long`` run's own split (split method ``file``),
the five averaged, so training randomness alone differs between members. ``combined`` takes,
per lever group, the option with the best mean **validation** AUC of the single-source runs (never
an external test set) and is trained like the others.

Budgets are in epochs (fixed per training set, below) so reruns do the same work; the measured
wall-clock and CPU time (process + DataLoader workers) are recorded per run. The results land in
``benchmarks/out/generalization/`` (git-ignored): one run directory and one ``results/<run>.json``
per run; a finished run is skipped when the script is run again, an interrupted training resumes.

    # everything, one run after another (hours on 2 cores)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generalization.py
    # the same, one run per hold of the shared heavy-job lock (others can land in between)
    for run in $(.venv/bin/python benchmarks/generalization.py --pending); do
        flock /tmp/covidscan-heavy.lock env HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generalization.py --only "$run"
    done
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generalization.py --table   # the table from finished runs
    # end-to-end check in a few minutes: 16 images per class, 64 px, 1 epoch per phase
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generalization.py --quick
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import covidscan  # noqa: F401  (installs the torchvision shim first)
from covidscan.config import RunConfig, config_from_dict
from covidscan.data import load_samples
from covidscan.data.shortcuts import expand_series
from covidscan.data.splits import save_splits
from covidscan.evaluation import evaluate
from covidscan.inference import make_ensemble
from covidscan.training import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = ROOT.parent / "shared" / "datasets"
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "generalization"
TTA_VIEWS = "identity,hflip"


@dataclass(frozen=True)
class Source:
    """A labelled CT source: where it is, how its labels map to ``COVID`` / ``non-COVID``, how it splits."""

    name: str
    path: str  # under the datasets folder
    label_map: dict[str, str] = field(default_factory=dict)
    split: str = "grouped"  # data.split.method when trained on
    note: str = ""


SOURCES = {
    source.name: source
    for source in (
        Source(
            "sarscov2-ct",
            "sarscov2-ct",
            split="stratified",
            note="no patient ids: the random split leaks patients, in-source figures are optimistic",
        ),
        Source("covid-ct", "covid-ct/metadata.csv", {"NonCOVID": "non-COVID"}, note="patient-grouped split"),
        Source(
            "covid-ct-md-sample",
            "covid-ct-md-sample",
            {"COVID-19": "COVID", "CAP": "non-COVID", "Normal": "non-COVID"},
            note="external only: 6 patients' DICOM slices (lung window)",
        ),
    )
}
TRAINING_SETS: dict[str, tuple[str, ...]] = {
    "sarscov2-ct": ("sarscov2-ct",),
    "covid-ct": ("covid-ct",),
    "both": ("sarscov2-ct", "covid-ct"),  # the multi-source lever: external is covid-ct-md-sample only
}
SINGLE_SOURCE = ("sarscov2-ct", "covid-ct")  # the leave-one-source-out pairs every lever is run on
OTHER_SOURCE = {"sarscov2-ct": "covid-ct", "covid-ct": "sarscov2-ct"}  # the site a single-source model adapts to
# epochs of the all-layers phase after the 1 head-only epoch, per training set (a few idle CPU-minutes each)
FULL_EPOCHS = {"sarscov2-ct": 2, "covid-ct": 6, "both": 2}
SPLIT_RATIOS = [0.6, 0.1, 0.3]
# 160 px, not study E's 224: half the CPU time per epoch, so every lever fits the 2-core budget
IMAGE_SIZE = 160


@dataclass(frozen=True)
class Recipe:
    """One lever: ``--set`` overrides on the plain recipe, or an evaluation-only variant of trained runs."""

    name: str
    description: str
    overrides: tuple[str, ...] = ()
    group: str | None = None  # lever group the combined recipe chooses in (one option per group)
    tta: bool = False  # evaluate with test-time augmentation: the ensemble if any, else the plain run
    ensemble_of: tuple[str, ...] = ()  # evaluate an ensemble of these recipes' runs (no training)
    ensemble_top: int = 0  # ... or of the trained recipes with the best validation AUC on the training set
    # a deep ensemble: the ensemble_of recipe trained again with these seeds on its own run's split
    member_seeds: tuple[int, ...] = ()
    # domain-adversarial training towards the other single source's training-split images (unlabelled),
    # compared with the recipe it adds the adaptation to
    adapt: bool = False
    baseline: str = "plain"
    full_epochs: dict[str, int] = field(default_factory=dict)  # all-layers epochs per training set, if not FULL_EPOCHS

    @property
    def trains(self) -> bool:
        return not self.tta and not self.ensemble_of and not self.ensemble_top

    @property
    def ensembles(self) -> bool:
        return bool(self.ensemble_of or self.ensemble_top)


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe("plain", "MobileNetV2 (ImageNet) + study E head, study E augmentation", group="*"),
        Recipe("lung-crop", "plain + crop to the lungs", ("data.lung=crop",), group="lung"),
        Recipe("lung-mask", "plain + black outside the lungs", ("data.lung=mask",), group="lung"),
        Recipe(
            "robust-aug",
            "plain + robust augmentation preset + CLAHE",
            ("data.augment.preset=robust", "data.intensity=clahe"),
            group="augment",
        ),
        Recipe(
            "lite0",
            "EfficientNet-Lite0 (ImageNet) instead of MobileNetV2",
            ("model.name=efficientnet_lite0", "data.normalize=inception"),
            group="backbone",
        ),
        Recipe(
            "lite1",
            "EfficientNet-Lite1 (ImageNet) instead of MobileNetV2",
            ("model.name=efficientnet_lite1", "data.normalize=inception"),
            group="backbone",
        ),
        Recipe(
            "harmonized",
            "every source-invariance lever at once: lung mask + CLAHE + robust augmentation",
            ("data.lung=mask", "data.intensity=clahe", "data.augment.preset=robust"),
        ),
        Recipe(
            "long",
            "plain at 224 px, about twice the epochs, cosine learning-rate decay",
            ("data.image_size=224", "training.phases.1.scheduler.name=cosine"),
            full_epochs={"sarscov2-ct": 4, "covid-ct": 14, "both": 4},
        ),
        Recipe(
            "long-mask",
            "long + black outside the lungs (the best in-source and the best external lever together)",
            ("data.image_size=224", "training.phases.1.scheduler.name=cosine", "data.lung=mask"),
            full_epochs={"sarscov2-ct": 4, "covid-ct": 14, "both": 4},
        ),
        Recipe(
            "lite2-long",
            "long with EfficientNet-Lite2 (ImageNet), the largest offline backbone, at its native 260 px",
            (
                "model.name=efficientnet_lite2",
                "data.normalize=inception",
                "data.image_size=260",
                "training.phases.1.scheduler.name=cosine",
            ),
            full_epochs={"sarscov2-ct": 4, "covid-ct": 14, "both": 4},
        ),
        Recipe(
            "dann",
            "plain + domain-adversarial training (DANN) towards the other source's unlabelled training-split images",
            adapt=True,
        ),
        Recipe(
            "dann-long",
            "long + domain-adversarial training (DANN) towards the other source's unlabelled training-split images",
            ("data.image_size=224", "training.phases.1.scheduler.name=cosine"),
            adapt=True,
            baseline="long",
            full_epochs={"sarscov2-ct": 4, "covid-ct": 14, "both": 4},
        ),
        Recipe("tta", f"plain, test-time augmentation ({TTA_VIEWS})", tta=True),
        Recipe("ensemble", "mean of plain + robust-aug + lite0", ensemble_of=("plain", "robust-aug", "lite0")),
        Recipe("ensemble-top3", "mean of the 3 trained recipes with the best validation AUC", ensemble_top=3),
        Recipe(
            "long-x5",
            "deep ensemble: long trained with 5 seeds (42, 1-4) on seed 42's split, mean of the 5",
            ensemble_of=("long",),
            member_seeds=(1, 2, 3, 4),
        ),
        Recipe(
            "long-x5-lite2",
            "long-x5 + lite2-long: six members, two architectures and input sizes, mean of the 6",
            ensemble_of=("long", "lite2-long"),
            member_seeds=(1, 2, 3, 4),
        ),
        Recipe(
            "long-x5-tta",
            f"long-x5 with test-time augmentation ({TTA_VIEWS})",
            ensemble_of=("long",),
            member_seeds=(1, 2, 3, 4),
            tta=True,
        ),
    )
}
LEVER_GROUPS = ("lung", "augment", "backbone")


@dataclass(frozen=True)
class Settings:
    datasets: Path
    out: Path
    quick: bool
    bootstrap: int
    workers: int
    seed: int

    @property
    def image_size(self) -> int:
        return 64 if self.quick else IMAGE_SIZE


def run_id(recipe: str, training_set: str) -> str:
    return f"{recipe}--{training_set}"


def base_config(training_set: str, settings: Settings) -> dict[str, Any]:
    """The plain recipe (study E's, as in benchmarks/study_e.py) on one training set."""
    sources = [SOURCES[name] for name in TRAINING_SETS[training_set]]
    if len(sources) == 1:
        data_source: Any = str(settings.datasets / sources[0].path)
        label_map, split = sources[0].label_map, {"method": sources[0].split, "ratios": SPLIT_RATIOS}
    else:  # several sources: each with its own label map, patients grouped within their source
        data_source = [
            {"name": source.name, "path": str(settings.datasets / source.path), "label_map": source.label_map}
            for source in sources
        ]
        label_map, split = {}, {"method": "grouped", "ratios": SPLIT_RATIOS, "stratify_by_source": True}
    full_epochs = 1 if settings.quick else FULL_EPOCHS[training_set]
    return {
        "name": training_set,
        "seed": settings.seed,
        "output_dir": str(settings.out / "runs"),
        "data": {
            "source": data_source,
            "label_map": label_map,
            "positive_class": "COVID",
            "image_size": settings.image_size,
            "channels": 3,
            "normalize": "imagenet",
            "augment": {"hflip": True, "rotation": 10, "zoom": 0.1},
            "split": split,
            "max_per_class": 16 if settings.quick else None,
            "num_workers": settings.workers,
        },
        "model": {"name": "mobilenet", "pretrained": True, "kwargs": {"head": "study_e"}},
        "training": {
            "batch_size": 32,
            "phases": [
                {"epochs": 1, "optimizer": "adam", "lr": 1e-3, "trainable": "head"},
                {"epochs": full_epochs, "optimizer": "adam", "lr": 1e-4, "trainable": "all"},
            ],
            "early_stopping": {"monitor": "val_loss", "patience": 4},
            "checkpoint_monitor": "val_loss",
        },
    }


def recipe_overrides(recipe: Recipe, training_set: str, settings: Settings) -> list[str]:
    """The ``--set`` overrides of ``recipe`` on the plain recipe for one training set."""
    overrides = list(recipe.overrides)
    if settings.quick:  # the quick size and epochs whatever the recipe says
        overrides = [o for o in overrides if not o.startswith("data.image_size=")]
    elif recipe.full_epochs:
        overrides.append(f"training.phases.1.epochs={recipe.full_epochs[training_set]}")
    if recipe.adapt:
        target = split_manifest(OTHER_SOURCE[training_set], "train", settings)
        overrides.append(f"training.domain_adaptation={{target: {target}}}")
    return overrides


def recipe_config(recipe: Recipe, training_set: str, settings: Settings) -> RunConfig:
    raw = base_config(training_set, settings)
    raw["name"] = run_id(recipe.name, training_set)
    return config_from_dict(raw, recipe_overrides(recipe, training_set, settings))


# --------------------------------------------------------------------------------------------- test sets


@dataclass(frozen=True)
class TestSet:
    """A set a run is evaluated on: its own test split (``data`` None) or a whole external source."""

    name: str
    data: Path | None
    label_map: dict[str, str]
    in_source: bool


def external_data(source: Source, settings: Settings) -> Path:
    """What ``evaluate`` reads for an external source: the dataset itself, or a manifest written once
    into the output folder (the DICOM series as slices; in ``--quick`` mode a small subset)."""
    path = settings.datasets / source.path
    series = source.name == "covid-ct-md-sample"
    if not series and not settings.quick:
        return path
    manifest = settings.out / "manifests" / f"{source.name}.csv"
    if not manifest.is_file():
        samples = load_samples(path, require_labels=True, max_per_class=20 if settings.quick else None)
        if series:
            samples = expand_series(samples)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        save_splits(samples, manifest)
    return manifest


def split_manifest(source: str, split: str, settings: Settings) -> Path:
    """One part of ``source``'s split in the plain run (seed 42's patients), as a manifest: the
    adapting recipes' unlabelled target images (``train``) and the held-out patients they are
    evaluated on (``test``), so no image a model adapted to is among those it is scored on."""
    splits = settings.out / "runs" / run_id("plain", source) / "splits.csv"
    if not splits.is_file():
        raise SystemExit(f"run {run_id('plain', source)} first: its split decides the adaptation and test images")
    manifest = settings.out / "manifests" / f"{source}-{split}-split.csv"
    if not manifest.is_file():
        with splits.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["split"] == split]
        manifest.parent.mkdir(parents=True, exist_ok=True)
        with manifest.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return manifest


def held_out_set(training_set: str, settings: Settings) -> TestSet:
    """The other source's own test split: patients an adapting recipe never saw, labelled or not."""
    other = OTHER_SOURCE[training_set]
    return TestSet(f"{other}-test-split", split_manifest(other, "test", settings), {}, False)


def test_sets(training_set: str, settings: Settings) -> list[TestSet]:
    trained_on = TRAINING_SETS[training_set]
    sets = [TestSet(f"{' + '.join(trained_on)} (in-source test)", None, {}, True)]
    for source in SOURCES.values():
        if source.name not in trained_on:
            sets.append(TestSet(source.name, external_data(source, settings), source.label_map, False))
    return sets


# --------------------------------------------------------------------------------------------- measuring


@contextmanager
def measured(record: dict[str, Any], key: str) -> Iterator[None]:
    """Wall-clock and CPU seconds (this process and its reaped children: DataLoader workers) of a block."""
    wall = time.perf_counter()
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    yield
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, usage))
    record[key] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu, 1)}


def _metric(payload: dict[str, Any], name: str) -> dict[str, Any] | None:
    return payload.get("metrics", {}).get(name)


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """The figures the table shows, from an evaluation's metrics.json payload."""
    operating = payload.get("operating_point", {})
    at_threshold = operating.get("metrics", {})
    return {
        "n_items": payload["n_items"],
        "n_patients": payload.get("n_patients"),
        "roc_auc": _metric(payload, "roc_auc"),
        "f1": _metric(payload, "f1"),
        "threshold": operating.get("threshold"),
        "sensitivity": at_threshold.get("sensitivity"),
        "specificity": at_threshold.get("specificity"),
        "f1_at_threshold": at_threshold.get("f1"),
        "patient_roc_auc": payload.get("patient_level", {}).get("metrics", {}).get("roc_auc"),
    }


def evaluate_all(model: Path, sets: list[TestSet], settings: Settings, tta: bool) -> dict[str, Any]:
    """Evaluate ``model`` (a run or ensemble directory) on its validation and test split and on each
    external set; an evaluation already written (its metrics.json) is read back."""
    suffix = "-tta" if tta else ""
    results = {}
    for test_set in [TestSet("validation", None, {}, True), *sets]:
        split = "val" if test_set.name == "validation" else "test"
        folder = split if test_set.data is None else f"external-{Path(test_set.name).name}"
        out = model / "evaluation" / f"{folder}{suffix}"
        if (out / "metrics.json").is_file():
            payload = json.loads((out / "metrics.json").read_text())
        else:
            payload = evaluate(
                model,
                test_set.data,
                split,
                out,
                test_set.label_map,
                settings.bootstrap,
                external=test_set.data is not None,
                tta=TTA_VIEWS if tta else None,
            ).report.to_dict()
        results[test_set.name] = {"in_source": test_set.in_source, **summarize(payload)}
    return results


# --------------------------------------------------------------------------------------------- runs


def result_file(settings: Settings, rid: str) -> Path:
    return settings.out / "results" / f"{rid}.json"


def load_result(settings: Settings, rid: str) -> dict[str, Any] | None:
    path = result_file(settings, rid)
    return json.loads(path.read_text()) if path.is_file() else None


def train_run(config: RunConfig, run_dir: Path, record: dict[str, Any]) -> None:
    """Train (or resume, or skip when finished) one run directory."""
    if (run_dir / "metrics.json").is_file():
        return
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    with measured(record, "training"):
        result = train(config, run_dir=run_dir, resume=resume)
    record["training"]["resumed"] = resume
    record["epochs"] = len(result.history)
    record["best_epoch"] = result.best_metrics


def train_seed_members(
    recipe: Recipe, training_set: str, seeds: tuple[int, ...], settings: Settings, record: dict[str, Any]
) -> list[Path]:
    """``recipe`` trained again with each of ``seeds`` on the split of its own run (``data.split.method:
    file``), so the members differ in initialisation, batch order and augmentation only; run directories
    are shared by every ensemble recipe that asks for them. Training time is summed into ``record``."""
    base_run = settings.out / "runs" / run_id(recipe.name, training_set)
    if not (base_run / "splits.csv").is_file():
        raise SystemExit(f"{recipe.name} seeds: run {base_run.name} first (its split is the members' split)")
    members, wall, cpu = [], 0.0, 0.0
    for seed in seeds:
        raw = base_config(training_set, settings)
        raw["name"] = run_id(f"{recipe.name}-seed{seed}", training_set)
        overrides = [
            *recipe_overrides(recipe, training_set, settings),
            f"seed={seed}",
            "data.split.method=file",
            f"data.split.file={base_run / 'splits.csv'}",
        ]
        run_dir = settings.out / "runs" / raw["name"]
        member_record: dict[str, Any] = {}
        train_run(config_from_dict(raw, overrides), run_dir, member_record)
        if "training" in member_record:  # trained now; a finished member adds no time to this record
            wall += member_record["training"]["wall_s"]
            cpu += member_record["training"]["cpu_s"]
        members.append(run_dir)
    if wall:
        record["training"] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "resumed": False}
    return members


def _epochs_per_member(runs: list[Path]) -> str:
    """``"5 x 14-15"``: how many runs and the range of their epoch counts (rows of history.csv)."""
    counts = [len((run / "history.csv").read_text().splitlines()) - 1 for run in runs]
    low, high = min(counts), max(counts)
    return f"{len(counts)} x {low}" + (f"-{high}" if high != low else "")


def combined_overrides(settings: Settings) -> tuple[str, ...]:
    """Per lever group, the option with the best mean validation AUC over the single-source runs
    (the plain recipe when it ties or wins); only in-source validation data decides."""
    chosen: list[str] = []
    for group in LEVER_GROUPS:
        options = [RECIPES["plain"], *(r for r in RECIPES.values() if r.group == group)]
        scores = {r.name: _mean_val_auc(settings, r.name) for r in options}
        if any(score is None for score in scores.values()):
            raise SystemExit(f"combined: run the {group} levers first ({scores})")
        best = max(options, key=lambda r: (scores[r.name], r.name == "plain"))
        chosen += best.overrides
    return tuple(chosen)


def _mean_val_auc(settings: Settings, recipe: str) -> float | None:
    values = []
    for training_set in SINGLE_SOURCE:
        result = load_result(settings, run_id(recipe, training_set))
        if result is None:
            return None
        values.append(result["evaluations"]["validation"]["roc_auc"]["value"])
    return sum(values) / len(values)


def best_on_validation(settings: Settings, training_set: str, count: int) -> tuple[str, ...]:
    """The ``count`` trained recipes with the highest validation AUC on ``training_set`` (model
    selection on in-source validation data only, never a test set)."""
    scores = {}
    for recipe in (r for r in RECIPES.values() if r.trains):
        result = load_result(settings, run_id(recipe.name, training_set))
        if result is None:
            raise SystemExit(f"ensemble of the best {count}: run {run_id(recipe.name, training_set)} first")
        scores[recipe.name] = result["evaluations"]["validation"]["roc_auc"]["value"]
    return tuple(sorted(scores, key=lambda name: -scores[name])[:count])


def execute(rid: str, settings: Settings) -> dict[str, Any]:
    """Train and evaluate one run (resumable); its record lands in results/<run>.json."""
    recipe_name, training_set = rid.split("--")
    record: dict[str, Any] = {"run": rid, "recipe": recipe_name, "training_set": training_set}
    sets = test_sets(training_set, settings)
    if recipe_name == "combined":
        recipe = Recipe("combined", "best option per lever group on validation", combined_overrides(settings))
    else:
        recipe = RECIPES[recipe_name]
    record["overrides"] = recipe_overrides(recipe, training_set, settings)
    if recipe.ensembles:
        model = settings.out / "ensembles" / rid
        chosen = recipe.ensemble_of or best_on_validation(settings, training_set, recipe.ensemble_top)
        members = [settings.out / "runs" / run_id(member, training_set) for member in chosen]
        if recipe.member_seeds:
            members += train_seed_members(RECIPES[chosen[0]], training_set, recipe.member_seeds, settings, record)
        if not (model / "ensemble.json").is_file():
            make_ensemble(members, model)
        record["members"] = [member.name for member in members]
        if recipe.member_seeds and not recipe.tta:  # the TTA variant reuses the members: no training of its own
            record["epochs"] = _epochs_per_member(members)
    elif recipe.tta:
        model = settings.out / "runs" / run_id("plain", training_set)
    else:
        model = settings.out / "runs" / rid
        train_run(recipe_config(recipe, training_set, settings), model, record)
    if recipe.adapt:  # scored on unseen target patients too, beside its unadapted recipe on the same images
        sets.append(held_out_set(training_set, settings))
        unadapted = settings.out / "runs" / run_id(recipe.baseline, training_set)
        record["baseline_recipe"] = recipe.baseline
        record["baseline"] = evaluate_all(unadapted, sets[-1:], settings, tta=False)
    with measured(record, "evaluation"):
        record["evaluations"] = evaluate_all(model, sets, settings, tta=recipe.tta)
    record["model"] = str(model.relative_to(settings.out))
    record["date"] = date.today().isoformat()
    record["commit"] = commit()
    record["machine"] = machine()
    path = result_file(settings, rid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return record


def plan() -> list[str]:
    """Every run in dependency order: trained levers, then the evaluation-only ones, then combined."""
    trained = [run_id(r.name, t) for r in RECIPES.values() if r.trains for t in SINGLE_SOURCE]
    derived = [run_id(r.name, t) for r in RECIPES.values() if not r.trains for t in SINGLE_SOURCE]
    combined = [run_id("combined", t) for t in TRAINING_SETS]
    return [*trained, run_id("plain", "both"), *derived, *combined]


def commit() -> str | None:
    """The covidscan commit the run was made with (None outside a git checkout)."""
    import subprocess

    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() or None


def machine() -> str:
    """The architecture, CPU count and torch threads a run was measured with."""
    import os

    import torch

    return f"{platform.machine()}, {os.cpu_count() or 0} CPUs, torch threads {torch.get_num_threads()}"


# --------------------------------------------------------------------------------------------- table


def ci_text(metric: dict[str, Any] | None) -> str:
    if not metric or metric.get("value") is None:
        return "-"
    if metric.get("ci_low") is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


def _sens_spec(cell: dict[str, Any]) -> str:
    sens, spec = cell.get("sensitivity"), cell.get("specificity")
    if not sens or not spec or sens.get("value") is None or spec.get("value") is None:
        return "-"
    return f"{sens['value']:.2f} / {spec['value']:.2f}"


def _minutes(record: dict[str, Any]) -> str:
    timing = record.get("training")
    if not timing:
        return "(no training)"
    return f"{timing['wall_s'] / 60:.1f} / {timing['cpu_s'] / 60:.1f}"


def markdown(records: list[dict[str, Any]]) -> str:
    """One table per training set: in-source test and every external set side by side, same form."""
    lines: list[str] = []
    for training_set in TRAINING_SETS:
        rows = [r for r in records if r["training_set"] == training_set]
        if not rows:
            continue
        names = [n for n in rows[0]["evaluations"] if n != "validation"]
        lines += [f"**Trained on {' + '.join(TRAINING_SETS[training_set])}**", ""]
        header = ["recipe", "epochs", "train min (wall / CPU)", "val AUC"]
        for name in names:
            header += [f"{name}: AUC [95% CI]", "sens / spec"]
        header.append("gap in-source - external (AUC)")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for record in rows:
            cells = record["evaluations"]
            home = cells[names[0]]["roc_auc"]
            gaps = [
                f"{home['value'] - cells[n]['roc_auc']['value']:+.2f}"
                for n in names[1:]
                if home and cells[n]["roc_auc"] and cells[n]["roc_auc"].get("value") is not None
            ]
            row = [
                record["recipe"],
                str(record.get("epochs", "-")),
                _minutes(record),
                ci_text(cells["validation"]["roc_auc"]),
            ]
            for name in names:
                row += [ci_text(cells[name]["roc_auc"]), _sens_spec(cells[name])]
            row.append(" / ".join(gaps) or "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def recipes_legend(records: list[dict[str, Any]]) -> str:
    lines = ["| recipe | what changes (`--set`) |", "|---|---|"]
    seen = set()
    for record in records:
        name = record["recipe"]
        if name in seen:
            continue
        seen.add(name)
        recipe = RECIPES.get(name)
        what = recipe.description if recipe else "best option per lever group on validation AUC"
        epochs = "training.phases.1.epochs="  # differs per training set: listed once, below
        overrides = ", ".join(f"`{o}`" for o in record.get("overrides", []) if not o.startswith(epochs)) or "-"
        if recipe and recipe.member_seeds:  # what each new member changes on the ensemble_of recipe's run
            base = recipe.ensemble_of[0]
            overrides = f"`seed=N`, `data.split.method=file`, `data.split.file=<{base} run>/splits.csv`"
        if recipe and recipe.adapt:  # the manifest's path is the benchmark's own: named, not printed
            overrides = ", ".join(
                [f"`{o}`" for o in recipe.overrides]
                + ["`training.domain_adaptation.target=<the other source's training split>`"]
            )
        if recipe and recipe.full_epochs:
            overrides += "; all-layers epochs " + ", ".join(f"{t} {n}" for t, n in recipe.full_epochs.items())
        lines.append(f"| {name} | {what}: {overrides} |")
    return "\n".join(lines)


def adaptation_table(records: list[dict[str, Any]]) -> str:
    """Each adapting run beside the plain run on the same held-out target patients."""
    rows = [r for r in records if "baseline" in r]
    if not rows:
        return ""
    lines = [
        "| trained on | adapted to (unlabelled) | model | in-source test AUC | target's held-out test split: AUC "
        "[95% CI] | sens / spec | target source in full (incl. adaptation images) |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in rows:
        training_set, other = record["training_set"], OTHER_SOURCE[record["training_set"]]
        held_out = f"{other}-test-split"
        home = next(n for n, c in record["evaluations"].items() if c["in_source"] and n != "validation")
        base = record.get("baseline_recipe", "plain")
        unadapted = load_result_for(records, run_id(base, training_set))
        for name, cells, full in (
            (base, record["baseline"], unadapted["evaluations"][other] if unadapted else None),
            (record["recipe"], record["evaluations"], record["evaluations"][other]),
        ):
            if name == base:
                in_source = unadapted["evaluations"][home]["roc_auc"] if unadapted else None
            else:
                in_source = record["evaluations"][home]["roc_auc"]
            lines.append(
                f"| {training_set} | {other} training split | {name} | {ci_text(in_source)} | "
                f"{ci_text(cells[held_out]['roc_auc'])} | {_sens_spec(cells[held_out])} | "
                f"{ci_text(full['roc_auc']) if full else '-'} |"
            )
    return "\n".join(lines)


def load_result_for(records: list[dict[str, Any]], rid: str) -> dict[str, Any] | None:
    return next((r for r in records if r["run"] == rid), None)


def finished(settings: Settings) -> list[dict[str, Any]]:
    return [r for rid in plan() if (r := load_result(settings, rid)) is not None]


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS, help="the shared datasets folder")
    parser.add_argument("--out", type=Path, help=f"results folder (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--quick", action="store_true", help="16 images per class, 64 px, 1 epoch per phase")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="run just these (names from --pending)")
    parser.add_argument("--pending", action="store_true", help="print the runs not finished yet, one a line")
    parser.add_argument("--table", action="store_true", help="print the table of finished runs and exit")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    out = args.out or (DEFAULT_OUT.with_name(DEFAULT_OUT.name + "-quick") if args.quick else DEFAULT_OUT)
    settings = Settings(args.datasets, out, args.quick, 200 if args.quick else args.bootstrap, args.workers, args.seed)
    if args.pending:
        print("\n".join(rid for rid in plan() if load_result(settings, rid) is None))
        return 0
    if not args.table:
        if not args.datasets.is_dir():
            print(f"{args.datasets}: shared datasets not found; pass --datasets", file=sys.stderr)
            return 2
        unknown = sorted(set(args.only or []) - set(plan()))
        if unknown:
            parser.error(f"unknown run(s) {unknown}; see --pending")
        for rid in args.only or plan():
            if load_result(settings, rid) is None:
                print(f"== {rid}", flush=True)
                _report(execute(rid, settings), print)
    records = finished(settings)
    text = markdown(records) + "\n" + recipes_legend(records)
    if adaptation := adaptation_table(records):
        text += "\n\n" + adaptation
    (settings.out / "results.md").parent.mkdir(parents=True, exist_ok=True)
    (settings.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


def _report(record: dict[str, Any], say: Callable[[str], None]) -> None:
    for name, cell in record["evaluations"].items():
        say(f"   {name:<32} AUC {ci_text(cell['roc_auc'])}  sens/spec {_sens_spec(cell)}")
    if "training" in record:
        say(f"   training {_minutes(record)} min (wall / CPU), {record.get('epochs')} epochs")


if __name__ == "__main__":
    sys.exit(main())
