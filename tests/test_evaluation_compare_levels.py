"""compare_runs at patient level: 3D runs with different stack depths compared on the same patients."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from covidscan.checkpoint import save_checkpoint
from covidscan.cli import main
from covidscan.config import config_from_dict
from covidscan.data.records import DataError, Sample, SampleSet
from covidscan.data.splits import save_splits
from covidscan.evaluation.compare import compare_runs
from covidscan.evaluation.results import PairComparison
from covidscan.models import ClassifierModel
from helpers import registered_model

CLASSES = ("COVID", "normal")
# patient -> (label, number of scans); p0 has two scans, which patient level must merge
PATIENTS = {
    "p0": ("COVID", 2),
    "p1": ("COVID", 1),
    "p2": ("COVID", 1),
    "p3": ("normal", 1),
    "p4": ("normal", 1),
    "p5": ("normal", 1),
}


def tiny3d(num_classes: int, in_channels: int = 1, pretrained: bool = False, weights: str | None = None):
    backbone = nn.Sequential(nn.Conv3d(in_channels, 4, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, num_classes))
    return ClassifierModel(backbone, head, spatial_dims=3)


def write_scans(root: Path) -> list[Sample]:
    """8-slice 16x16 NIfTI scans in HU, all in the test split."""
    rng = np.random.default_rng(0)
    samples = []
    for patient, (label, scans) in PATIENTS.items():
        for k in range(scans):
            path = root / f"{patient}_scan{k}.nii.gz"
            hu = rng.uniform(-1000, 200, size=(16, 16, 8)).astype(np.float32)
            nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
            samples.append(Sample(str(path), label, patient, "test"))
    return samples


def make_run(root: Path, name: str, depth: int, samples: list[Sample], seed: int) -> Path:
    """A checkpoint of an untrained tiny 3D model cutting scans into ``depth``-slice stacks."""
    config = config_from_dict(
        {
            "name": name,
            "data": {
                "source": str(root),
                "spatial_dims": 3,
                "depth": depth,
                "image_size": 16,
                "channels": 1,
                "normalize": "none",
            },
            "model": {"name": "compare_levels_tiny3d"},
            "training": {"batch_size": 8},
        }
    )
    torch.manual_seed(seed)
    run = root / name
    save_checkpoint(
        run / "checkpoints" / "best.pt",
        model=tiny3d(len(CLASSES)),
        config=config,
        class_names=list(CLASSES),
        norm_stats=None,
        epoch=0,
    )
    save_splits(SampleSet(samples, list(CLASSES)), run / "splits.csv")
    return run


@pytest.fixture(autouse=True)
def _tiny3d_registered():
    with registered_model("compare_levels_tiny3d", tiny3d, spatial_dims=3):
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("levels")
    samples = write_scans(root)
    return {
        "d2": make_run(root, "d2", 2, samples, seed=0),
        "d4": make_run(root, "d4", 4, samples, seed=1),
        "d4b": make_run(root, "d4b", 4, samples, seed=2),
    }


def fisher_table(pair: PairComparison) -> list[list[int]]:
    (fisher,) = [t for t in pair.tests if t.test.startswith("Fisher")]
    return json.loads(re.search(r"= (\[\[.*\]\])", fisher.detail).group(1))


def test_item_level_refuses_different_depths_and_points_to_patient_level(runs, tmp_path):
    with pytest.raises(DataError, match=r"different items.*--level patient"):
        compare_runs([runs["d2"], runs["d4"]], level="item", n_bootstrap=0, out_dir=tmp_path / "cmp")


def test_patient_level_counts_patients_in_every_test(runs, tmp_path):
    result = compare_runs(
        [runs["d2"], runs["d4"]], level="patient", metric="accuracy", n_bootstrap=20, out_dir=tmp_path / "cmp"
    )
    n_patients = len(PATIENTS)
    assert (result.level, result.aggregation, result.n_compared) == ("patient", "mean", n_patients)
    (pair,) = result.pairs
    table = fisher_table(pair)
    assert [sum(row) for row in table] == [n_patients, n_patients]
    accuracy = {row.run: row.metrics["accuracy"].value for row in result.rows}
    assert table[0][0] == round(accuracy[pair.a] * n_patients)  # Fisher agrees with the patient-level table
    assert table[1][0] == round(accuracy[pair.b] * n_patients)
    assert {t.test.split(" ")[0] for t in pair.tests} == {"McNemar", "Fisher", "DeLong"}
    assert set(pair.differences) == set(result.metrics)
    assert result.grids == {}  # a patient is several stacks: no image grid
    html = (tmp_path / "cmp" / "comparison.html").read_text(encoding="utf-8")
    assert "Patient level" in html and f"{n_patients} patients" in html and "<img" not in html
    with (tmp_path / "cmp" / "comparison.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["level"], row["aggregation"], row["n_compared"]) for row in rows} == {("patient", "mean", "6")}


def test_auto_level_picks_patients_for_stacks_and_item_level_works_at_one_depth(runs, tmp_path):
    auto = compare_runs([runs["d4"], runs["d4b"]], n_bootstrap=0, out_dir=tmp_path / "auto")
    assert (auto.level, auto.n_compared) == ("patient", len(PATIENTS))
    items = compare_runs([runs["d4"], runs["d4b"]], level="item", n_bootstrap=0, out_dir=tmp_path / "items")
    assert items.level == "item" and items.aggregation is None
    assert items.n_compared > sum(scans for _, scans in PATIENTS.values())  # several stacks per scan
    assert [sum(row) for row in fisher_table(items.pairs[0])] == [items.n_compared] * 2


def test_cli_compare_patient_level_and_label_map_errors(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "compare",
                str(runs["d2"]),
                str(runs["d4"]),
                "--level",
                "patient",
                "--aggregation",
                "max",
                "--bootstrap",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert f"{len(PATIENTS)} patients, max of their items" in capsys.readouterr().out
    assert json.loads((out / "comparison.json").read_text())["aggregation"] == "max"
    assert (
        main(["compare", str(runs["d2"]), str(runs["d4"]), "--level", "item", "--bootstrap", "0", "--out", str(out)])
        == 2
    )
    assert "--level patient" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(runs["d2"]), "--label-map", "COVID"]) == 2
    assert "'COVID' must look like RAW=CLASS" in capsys.readouterr().err
