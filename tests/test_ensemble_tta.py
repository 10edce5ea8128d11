"""Ensembles and test-time augmentation: exactly the mean of the parts, accepted like any run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.checkpoint import ModelFileError
from covidscan.cli import main
from covidscan.data import DataError, load_samples
from covidscan.data.records import SampleSet
from covidscan.data.splits import save_splits
from covidscan.errors import UsageError
from covidscan.evaluation import evaluate
from covidscan.explain import explain_image
from covidscan.inference import load_predictor, make_ensemble
from covidscan.inference.tta import parse_tta
from helpers import CLASSES, make_checkpoint, png_bytes, write_image_folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("ensemble-images") / "images", {"COVID": 4, "normal": 4})


def shared_splits(images: Path, *runs: Path) -> None:
    """The same splits.csv in every run: half of each class to test, the rest to val."""
    samples = load_samples(images).samples
    assigned = [s.with_split("test" if i % 2 else "val") for i, s in enumerate(samples)]
    for run in runs:
        save_splits(SampleSet(assigned, CLASSES), run / "splits.csv")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, images) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ensemble-runs")
    a = make_checkpoint(root, seed=1, name="a")
    b = make_checkpoint(root, size=48, seed=2, name="b")  # another input size: its own preprocessing
    shared_splits(images, a, b)
    return a, b


@pytest.fixture(scope="module")
def ensemble(runs, tmp_path_factory) -> Path:
    return make_ensemble(runs, tmp_path_factory.mktemp("ensemble") / "ens")


def test_ensemble_of_two_runs_is_the_mean_of_their_probabilities(runs, ensemble, images):
    members = [load_predictor(run) for run in runs]
    combined = load_predictor(ensemble)
    assert combined.is_ensemble and len(combined.views) == 2  # 32 px and 48 px inputs
    for path in sorted(images.rglob("*.png"))[:3]:
        expected = np.mean([m.predict_batch([v[None] for v in m.read(path)])[0] for m in members], axis=0)
        actual = combined.predict_batch([v[None] for v in combined.read(path)])[0]
        np.testing.assert_allclose(actual, expected, atol=1e-6)
    plain = [evaluate(run, n_bootstrap=0, write=False).predictions.proba for run in runs]
    together = evaluate(ensemble, n_bootstrap=0, write=False)
    np.testing.assert_allclose(together.predictions.proba, np.mean(plain, axis=0), atol=1e-6)
    assert together.report.model == "ensemble(cnn1, cnn1)" and together.report.split == "test"


def test_ensemble_directory_is_accepted_by_predict_serve_and_explain(ensemble, images, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(ensemble), "--input", str(images), "--out", str(out)]) == 0
    with open(out) as handle:
        assert len(list(csv.DictReader(handle))) == 8
    sidecar = json.loads(out.with_name("p.csv.json").read_text())
    assert sidecar["model"]["model_id"] == "ens" and "Research use only" in sidecar["notice"]
    explanation = explain_image(load_predictor(ensemble), np.random.default_rng(0).random((40, 40)).astype("f4"))
    assert explanation.map.shape == (32, 32) and 0.0 <= explanation.map.min() <= explanation.map.max() <= 1.0
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from covidscan.serving import create_app

    with TestClient(create_app(ensemble)) as client:
        card = client.get("/v1/model").json()
        assert len(card["members"]) == 2 and card["explain_available"]
        body = client.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")}).json()
        assert body["predicted_label"] in CLASSES and body["model_id"] == "ens"


def test_ensemble_cli_and_its_refusals(runs, tmp_path, capsys):
    assert main(["ensemble", *map(str, runs), "--out", str(tmp_path / "e")]) == 0
    assert "share one splits.csv" in capsys.readouterr().out
    assert main(["ensemble", *map(str, runs), "--out", str(tmp_path / "e")]) == 2  # not empty
    swapped = make_checkpoint(tmp_path, name="other")
    payload = torch.load(swapped / "checkpoints" / "best.pt", weights_only=True)
    payload["class_names"] = ["normal", "COVID"]
    torch.save(payload, swapped / "checkpoints" / "best.pt")
    with pytest.raises(ModelFileError, match="same classes"):
        make_ensemble([runs[0], swapped], tmp_path / "bad")
    with pytest.raises(UsageError, match="two runs"):
        make_ensemble([runs[0]], tmp_path / "one")


def test_a_changed_member_checkpoint_is_refused(runs, tmp_path):
    ensemble = make_ensemble(runs, tmp_path / "e")
    member = next((ensemble / "members").glob("*/checkpoints/best.pt"))
    payload = torch.load(member, weights_only=True)
    payload["epoch"] = 99
    torch.save(payload, member)
    with pytest.raises(ModelFileError, match="changed since"):
        load_predictor(ensemble)


def test_the_same_split_written_in_an_older_layout_is_shared(runs, tmp_path):
    """A run from before splits.csv had its `source` column holds the same split: the ensemble keeps it."""
    older = make_checkpoint(tmp_path, seed=3, name="older")
    rows = list(csv.DictReader((runs[0] / "splits.csv").open()))
    with (older / "splits.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "patient_id", "split"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert (older / "splits.csv").read_bytes() != (runs[0] / "splits.csv").read_bytes()
    ensemble = make_ensemble([runs[0], older], tmp_path / "e")
    assert (ensemble / "splits.csv").is_file()
    assert evaluate(ensemble, n_bootstrap=0, write=False).report.n_items == 4


def test_members_with_different_splits_leave_the_ensemble_without_a_test_split(runs, images, tmp_path):
    other = make_checkpoint(tmp_path, seed=3, name="c")
    samples = [s.with_split("test") for s in load_samples(images).samples]
    save_splits(SampleSet(samples, CLASSES), other / "splits.csv")
    ensemble = make_ensemble([runs[0], other], tmp_path / "e")
    assert not (ensemble / "splits.csv").exists()
    with pytest.raises(DataError, match="no splits.csv"):
        evaluate(ensemble, n_bootstrap=0, write=False)


def test_tta_identity_equals_plain_prediction_and_hflip_averages_the_mirror(runs, images, tmp_path):
    plain, identity, flips = (load_predictor(runs[0], tta=t) for t in (None, "identity", "identity,hflip"))
    batch = torch.stack([plain.read(p)[0] for p in sorted(images.rglob("*.png"))])
    np.testing.assert_array_equal(identity.predict_batch(batch), plain.predict_batch(batch))
    mirrored = (plain.predict_batch(batch) + plain.predict_batch(torch.flip(batch, dims=(-1,)))) / 2
    np.testing.assert_allclose(flips.predict_batch(batch), mirrored, atol=1e-6)
    shifted = load_predictor(runs[0], tta="identity,hflip,shift").predict_batch(batch)
    assert shifted.shape == (8, 2) and np.allclose(shifted.sum(axis=1), 1.0, atol=1e-5)
    evaluation = evaluate(runs[0], n_bootstrap=0, tta="identity,hflip")
    assert evaluation.report.tta == ["identity", "hflip"] and evaluation.out_dir.name == "test-tta"
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(runs[0]), "--input", str(images), "--out", str(out), "--tta"]) == 0
    assert json.loads(out.with_name("p.csv.json").read_text())["model"]["tta"] == ["identity", "hflip"]


def test_tta_names_are_checked():
    assert parse_tta(None) == ("identity",)
    with pytest.raises(UsageError, match="unknown test-time augmentation"):
        parse_tta("identity,rotate")
    with pytest.raises(UsageError, match="twice"):
        parse_tta(["hflip", "hflip"])
