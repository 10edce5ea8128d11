"""evaluate_run / compare_runs / CLI on tiny synthetic checkpoints: files, report, errors."""

from __future__ import annotations

import base64
import csv
import json
import shutil
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from covidscan.checkpoint import save_checkpoint
from covidscan.cli import main
from covidscan.config import config_from_dict
from covidscan.data import load_samples
from covidscan.data.records import DataError, SampleSet
from covidscan.data.splits import save_splits
from covidscan.evaluation import evaluate_run
from covidscan.evaluation.compare import compare_runs
from covidscan.models import create_model
from helpers import write_image_folder


class ImageCollector(HTMLParser):
    """Collects <img src> values; parsing fails loudly on broken markup via the strict checks below."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def parse_html(path: Path) -> ImageCollector:
    parser = ImageCollector()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert {"html", "body", "table", "h1"} <= set(parser.tags)
    return parser


def assert_embedded_pngs(images: list[str], expected: int) -> None:
    assert len(images) == expected
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    name: str,
    model: str,
    images: Path,
    classes=("COVID", "normal"),
    seed: int = 0,
    zero_weights: bool = False,
) -> Path:
    """A checkpoint of an untrained tiny model plus a splits.csv (alternate images to val / test);
    ``zero_weights``: every parameter zero, so the model gives every image the same score."""
    config = config_from_dict(
        {
            "name": name,
            "data": {"source": str(images), "image_size": 32, "channels": 1, "normalize": "sample"},
            "model": {"name": model},
            "training": {"batch_size": 8},
        }
    )
    torch.manual_seed(seed)
    network = create_model(model, len(classes), in_channels=1)
    if zero_weights:
        for parameter in network.parameters():
            torch.nn.init.zeros_(parameter)
    run = root / name
    save_checkpoint(
        run / "checkpoints" / "best.pt",
        model=network,
        config=config,
        class_names=list(classes),
        norm_stats=None,
        epoch=0,
    )
    samples = load_samples(images)
    split = [s.with_split(("train", "val", "test")[i % 3]) for i, s in enumerate(samples.samples)]
    save_splits(SampleSet(split, samples.class_names), run / "splits.csv")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluation")
    images = write_image_folder(root / "images", {"COVID": 12, "normal": 12})
    external = write_image_folder(root / "external", {"CT_COVID": 5, "CT_NonCOVID": 5}, seed=1)
    return {
        "images": images,
        "external": external,
        "a": make_run(root, "a", "cnn1", images),
        "b": make_run(root, "b", "cnn2", images, seed=1),
        "root": root,
    }


def test_evaluate_run_writes_every_output_and_a_self_contained_report(runs):
    result = evaluate_run(runs["a"], n_bootstrap=50)
    out = runs["a"] / "evaluation" / "test"
    for name in (
        "metrics.json",
        "predictions.csv",
        "confusion_matrix.png",
        "roc_pr_curves.png",
        "reliability_diagram.png",
        "report.html",
        "report.md",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_items"] == result.n_items == 8 and saved["split"] == "test"
    assert saved["positive_class"] == "COVID"
    for metric in saved["metrics"].values():
        assert metric["value"] is not None or metric["undefined"]
        if metric["value"] is not None:
            assert metric["ci_low"] <= metric["value"] + 1e-9 and metric["value"] <= metric["ci_high"] + 1e-9
    assert saved["operating_point"]["chosen_on"].startswith("val")
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    assert {"path", "patient_id", "true", "predicted", "prob_COVID", "prob_normal"} <= set(rows[0])
    assert_embedded_pngs(parse_html(out / "report.html").images, 3)
    markdown = (out / "report.md").read_text()
    assert "ROC AUC" in markdown and "(95% CI)" in markdown and "confusion_matrix.png" in markdown


def test_external_evaluation_with_label_map_states_mapping_and_shift(runs):
    result = evaluate_run(
        runs["a"],
        data=runs["external"],
        external=True,
        n_bootstrap=20,
        label_map={"CT_COVID": "COVID", "CT_NonCOVID": "normal"},
    )
    assert result.external and result.split == "all" and result.n_items == 10
    out = runs["a"] / "evaluation" / "external-external"
    html = (out / "report.html").read_text()
    assert "CT_NonCOVID &rarr; normal" in html and "domain shift" in html and "external" in html


def test_evaluating_the_val_split_warns_that_its_threshold_is_optimistic(runs, tmp_path):
    result = evaluate_run(runs["a"], split="val", n_bootstrap=0, out_dir=tmp_path / "val")
    assert any("optimistic" in w for w in result.warnings)


def test_mismatched_classes_suggest_label_map(runs):
    with pytest.raises(DataError, match="--label-map"):
        evaluate_run(runs["a"], data=runs["external"], n_bootstrap=0)


def test_empty_split_is_a_clear_error(runs, tmp_path):
    run = tmp_path / "empty"
    shutil.copytree(runs["a"], run)
    samples = load_samples(runs["images"])
    save_splits(SampleSet([s.with_split("train") for s in samples.samples], samples.class_names), run / "splits.csv")
    with pytest.raises(DataError, match="holds no samples"):
        evaluate_run(run, n_bootstrap=0)


def test_single_class_external_set_reports_undefined_auc(runs, tmp_path):
    only_covid = write_image_folder(tmp_path / "only", {"COVID": 4})
    result = evaluate_run(runs["a"], data=only_covid, external=True, n_bootstrap=20, out_dir=tmp_path / "out")
    assert result.metrics["roc_auc"].value is None
    assert "only one class" in result.metrics["roc_auc"].undefined
    assert "undefined: only one class" in (tmp_path / "out" / "report.md").read_text()


def test_patient_level_metrics_when_patient_ids_exist(runs, tmp_path):
    images = sorted(runs["images"].rglob("*.png"))  # 12 COVID then 12 normal: two slices per patient
    rows = ["path,label,patient_id"] + [f"{p},{p.parent.name},{p.parent.name}-{i // 2}" for i, p in enumerate(images)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    result = evaluate_run(runs["a"], data=manifest, n_bootstrap=20, out_dir=tmp_path / "out")
    assert result.bootstrap.unit == "patient"
    assert result.patient_level.n_patients == 12 and result.n_patients == 12


def test_three_class_run_reports_macro_metrics_and_covid_vs_rest(tmp_path):
    images = write_image_folder(tmp_path / "images", {"CP": 6, "NCP": 6, "Normal": 6})
    run = make_run(tmp_path, "c3", "cnn1", images, classes=("CP", "NCP", "Normal"))
    result = evaluate_run(run, n_bootstrap=20)
    assert result.positive_class == "NCP"
    assert {"macro_f1", "macro_auroc"} <= set(result.metrics)
    assert len(result.confusion_matrix.counts) == 3
    assert_embedded_pngs(parse_html(run / "evaluation" / "test" / "report.html").images, 3)


def test_compare_runs_table_tests_and_grids(runs, tmp_path):
    result = compare_runs(
        [runs["a"], runs["b"]], metric="accuracy", n_bootstrap=30, grid_size=4, out_dir=tmp_path / "cmp"
    )
    assert [row.rank for row in result.rows] == [1, 2]
    values = [row.metrics["accuracy"].value for row in result.rows]
    assert values == sorted(values, reverse=True)
    assert all(row.parameters > 0 for row in result.rows)
    assert {t.test.split(" ")[0] for t in result.pairs[0].tests} == {"McNemar", "Fisher", "DeLong"}
    assert set(result.pairs[0].differences) == set(result.metrics)
    for name in ("comparison.csv", "comparison.md", "comparison.json"):
        assert (tmp_path / "cmp" / name).is_file()
    assert_embedded_pngs(parse_html(tmp_path / "cmp" / "comparison.html").images, 2)


def test_compare_refuses_runs_scored_on_different_items(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["b"], other)
    samples = load_samples(runs["images"])
    save_splits(
        SampleSet(
            [s.with_split(("test", "val", "train")[i % 3]) for i, s in enumerate(samples.samples)], samples.class_names
        ),
        other / "splits.csv",
    )
    with pytest.raises(DataError, match="different items"):
        compare_runs([runs["a"], other], n_bootstrap=0, out_dir=tmp_path / "cmp")


def test_cli_evaluate_and_compare(runs, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(runs["a"]),
            "--bootstrap",
            "20",
            "--target-sensitivity",
            "0.9",
            "--temperature-scaling",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["operating_point"]["method"] == "sensitivity" and saved["calibration"]["temperature"] > 0
    assert "report:" in capsys.readouterr().out
    assert (
        main(
            [
                "compare",
                str(runs["a"]),
                str(runs["b"]),
                "--bootstrap",
                "20",
                "--grid-size",
                "2",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert "vs" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(runs["a"]), "--data", str(runs["external"])]) == 2
    assert "--label-map" in capsys.readouterr().err


@pytest.mark.integration
def test_external_evaluation_on_real_covid_ct(runs, shared_datasets, tmp_path):
    """UCSD COVID-CT as an external set: its NonCOVID label mapped to the model's class, patients known."""
    manifest = shared_datasets / "covid-ct" / "metadata.csv"
    result = evaluate_run(
        runs["a"],
        data=manifest,
        external=True,
        n_bootstrap=50,
        out_dir=tmp_path / "ext",
        label_map={"NonCOVID": "normal"},
    )
    assert result.n_items == 746 and result.class_counts == {"COVID": 349, "normal": 397}
    assert result.bootstrap.unit == "patient" and result.patient_level.n_patients < 746
    assert "NonCOVID &rarr; normal" in (tmp_path / "ext" / "report.html").read_text()


def test_metrics_json_keeps_its_layout(runs, tmp_path):
    """The typed report's to_dict() is metrics.json as readers know it (sections in the same order)."""
    report = evaluate_run(runs["a"], n_bootstrap=10, out_dir=tmp_path / "ev")
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(saved) == [
        "run",
        "checkpoint",
        "model",
        "model_id",
        "model_version",
        "checkpoint_sha256",
        "engine",
        "tta",
        "dataset",
        "split",
        "external",
        "label_map",
        "class_names",
        "positive_class",
        "n_items",
        "n_patients",
        "class_counts",
        "metrics",
        "bootstrap",
        "confusion_matrix",
        "per_class",
        "calibration",
        "warnings",
        "skipped",
        "operating_point",
        "figures",
    ]
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert set(saved["operating_point"]) >= {"threshold", "chosen_on", "metrics", "confusion_matrix"}
    assert saved["operating_point"]["threshold"] == report.operating_point.point.threshold
    assert list(saved["metrics"]["accuracy"]) == ["value", "ci_low", "ci_high", "undefined"]


def _train_val_only(run: Path, images: Path, target: Path) -> Path:
    """A copy of ``run`` whose splits.csv holds train and val only (study A's 3:1 protocol)."""
    shutil.copytree(run, target)
    samples = load_samples(images)
    split = [s.with_split("val" if i % 4 == 0 else "train") for i, s in enumerate(samples.samples)]
    save_splits(SampleSet(split, samples.class_names), target / "splits.csv")
    return target


def test_compare_without_test_split_falls_back_to_val_with_a_note(runs, tmp_path, capsys):
    a = _train_val_only(runs["a"], runs["images"], tmp_path / "a")
    b = _train_val_only(runs["b"], runs["images"], tmp_path / "b")
    result = compare_runs([a, b], n_bootstrap=0, grid_size=2, out_dir=tmp_path / "cmp")
    assert result.split == "val" and result.n_compared == 6
    assert any("no test items" in note for note in result.notes)
    assert "no test items" in (tmp_path / "cmp" / "comparison.html").read_text()
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["notes"] == result.notes
    with pytest.raises(DataError, match="--split val"):
        compare_runs([a, b], split="test", n_bootstrap=0, out_dir=tmp_path / "explicit")
    assert main(["compare", str(a), str(b), "--metric", "f1", "--bootstrap", "0", "--out", str(tmp_path / "c")]) == 0
    assert "note: the runs' splits hold no test items" in capsys.readouterr().out


def test_evaluating_one_run_draws_study_ds_prediction_grid(runs, tmp_path):
    report = evaluate_run(runs["a"], n_bootstrap=0, out_dir=tmp_path / "grid", grid_size=4)
    grid = tmp_path / "grid" / "prediction_grid.png"
    assert report.figures["prediction_grid"] == grid.name and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![prediction grid](prediction_grid.png)" in (tmp_path / "grid" / "report.md").read_text()
    assert 'href="prediction_grid.png"' in (tmp_path / "grid" / "report.html").read_text()
    assert main(["evaluate", "--checkpoint", str(runs["a"]), "--grid-size", "0", "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none" / "prediction_grid.png").exists()


def test_verdict_on_external_auc():
    from covidscan.evaluation.metrics import MetricValue
    from covidscan.evaluation.transfer import transfer_verdict

    home = MetricValue(0.95, ci_low=0.92, ci_high=0.97)
    assert transfer_verdict(home, MetricValue(0.93, ci_low=0.88, ci_high=0.97)).startswith("transfers: AUC within")
    assert transfer_verdict(home, MetricValue(0.88, ci_low=0.81, ci_high=0.93)).startswith("transfers partly")
    assert transfer_verdict(home, MetricValue(0.80, ci_low=0.70, ci_high=0.88)).startswith(
        "does not transfer: AUC 0.15"
    )
    assert "close to chance" in transfer_verdict(home, MetricValue(0.54, ci_low=0.51, ci_high=0.57))
    assert "CI reaches 0.5" in transfer_verdict(home, MetricValue(0.62, ci_low=0.45, ci_high=0.74))
    assert "CI reaches 0.5" in transfer_verdict(None, MetricValue(0.62, ci_low=0.45, ci_high=0.74))
    inverted = transfer_verdict(home, MetricValue(0.16, ci_low=0.04, ci_high=0.22))
    assert inverted.startswith("does not transfer: worse than chance") and "CI below 0.5" in inverted
    assert "CI reaches 0.5" in transfer_verdict(home, MetricValue(0.40, ci_low=0.30, ci_high=0.51))
    assert "worse than chance" in transfer_verdict(None, MetricValue(0.30))  # no CI (no bootstrap)
    assert "close to chance" in transfer_verdict(None, MetricValue(0.45))
    assert transfer_verdict(home, MetricValue(None, "only one class present")).startswith("AUC undefined")
    assert transfer_verdict(None, MetricValue(0.8, ci_low=0.7, ci_high=0.9)) == "no in-source AUC to compare with"


def test_several_external_sets_in_one_report(runs, tmp_path):
    from covidscan.evaluation.transfer import EvaluationSetSpec, evaluate_sets

    other = write_image_folder(tmp_path / "hospital-c", {"COVID": 4, "normal": 4}, seed=2)
    mapping = {"CT_COVID": "COVID", "CT_NonCOVID": "normal"}
    summary = evaluate_sets(
        runs["a"],
        [EvaluationSetSpec(runs["external"], "hospital-b", mapping), EvaluationSetSpec(other)],
        out_dir=tmp_path / "sets",
        n_bootstrap=30,
        grid_size=2,
    )
    assert [row.name for row in summary.rows] == ["test", "hospital-b", "external-hospital-c"]
    assert [row.external for row in summary.rows] == [False, True, True]
    assert summary.reference == "test" and [row.n_items for row in summary.rows] == [8, 10, 8]
    reference, external = summary.row("test"), summary.row("hospital-b")
    assert external.auc_drop == pytest.approx(reference.roc_auc.value - external.roc_auc.value)
    assert external.threshold == reference.threshold is not None  # one threshold, chosen on the run's val
    assert external.sensitivity.ci_low is not None and external.verdict
    for name in ("test", "hospital-b", "external-hospital-c"):
        saved = json.loads((tmp_path / "sets" / name / "metrics.json").read_text())
        assert saved["n_items"] == summary.row(name).n_items
    assert (
        json.loads((tmp_path / "sets" / "hospital-b" / "metrics.json").read_text())["label_map"]["CT_COVID"] == "COVID"
    )
    saved = json.loads((tmp_path / "sets" / "summary.json").read_text())
    assert [row["name"] for row in saved["rows"]] == ["test", "hospital-b", "external-hospital-c"]
    html = tmp_path / "sets" / "report.html"
    assert_embedded_pngs(parse_html(html).images, 1 + 3)  # every set's ROC by set, plus each set's curves
    text = html.read_text()
    assert 'href="hospital-b/report.html"' in text and "CT_NonCOVID &rarr; normal" in text
    markdown = (tmp_path / "sets" / "report.md").read_text()
    assert "| hospital-b | external |" in markdown and "| test | in-source |" in markdown


def test_the_combined_report_shows_each_sets_grad_cam_share_outside_the_lungs(runs, tmp_path, monkeypatch):
    from covidscan.evaluation.transfer import EvaluationSetSpec, evaluate_sets
    from covidscan.explain.lung_check import summarize_shares

    calls = []

    def measured(predictor, samples, max_images, seed):  # lungs found in the run's own images only
        calls.append(len(samples))
        share = float("nan") if "external" in samples[0].path else 0.25
        return {"method": "gradcam", "data_lung": "none", **summarize_shares([share] * min(len(samples), max_images))}

    # the module, which the package's evaluate() function shadows as an attribute
    monkeypatch.setattr(sys.modules["covidscan.evaluation.evaluate"], "cam_lung_check", measured)
    mapping = {"CT_COVID": "COVID", "CT_NonCOVID": "normal"}
    summary = evaluate_sets(
        runs["a"],
        [EvaluationSetSpec(runs["external"], "site-b", mapping)],
        out_dir=tmp_path / "sets",
        n_bootstrap=0,
        grid_size=0,
        cam_lung=3,
    )
    saved = json.loads((tmp_path / "sets" / "summary.json").read_text())
    for row in saved["rows"]:  # the per-set result, not measured again
        assert row["cam_lung"] == json.loads((tmp_path / "sets" / row["name"] / "metrics.json").read_text())["cam_lung"]
    assert (
        len(calls) == 2
        and summary.row("test").cam_lung["n_measured"] == 3
        and summary.row("site-b").cam_lung["n_measured"] == 0
    )
    markdown = (tmp_path / "sets" / "report.md").read_text()
    assert "Grad-CAM outside lungs |" in markdown
    assert "| 0.250 (3 of 3 images) |" in markdown and "| - |" in markdown
    assert "<th>Grad-CAM outside lungs</th>" in (tmp_path / "sets" / "report.html").read_text()
    plain = evaluate_sets(runs["a"], [], out_dir=tmp_path / "plain", n_bootstrap=0, grid_size=0)
    assert plain.rows[0].cam_lung is None and "Grad-CAM" not in (tmp_path / "plain" / "report.md").read_text()


def test_only_the_runs_own_split_is_labelled_in_source(runs, tmp_path, capsys):
    from covidscan.evaluation.transfer import EvaluationSetSpec, evaluate_sets

    mapping = {"CT_COVID": "COVID", "CT_NonCOVID": "normal"}
    given = [EvaluationSetSpec(runs["images"], "a", external=False), EvaluationSetSpec(runs["external"], "b", mapping)]
    summary = evaluate_sets(runs["a"], given, out_dir=tmp_path / "home", n_bootstrap=0, grid_size=0)
    assert [row.kind for row in summary.rows] == ["in-source", "given (--data)", "external"]
    # no own test split (like an ensemble of runs split differently): no set is in-source
    run = _train_val_only(runs["a"], runs["images"], tmp_path / "train-val")
    out = tmp_path / "cli"
    argv = [
        "evaluate",
        "--checkpoint",
        str(run),
        "--data",
        f"a={runs['images']}",
        "--external",
        f"b={runs['external']}",
    ]
    labels = ["--label-map", "CT_COVID=COVID", "CT_NonCOVID=normal"]
    assert main([*argv, *labels, "--bootstrap", "0", "--grid-size", "0", "--out", str(out)]) == 0
    assert "given (--data)" in capsys.readouterr().out
    assert [row["kind"] for row in json.loads((out / "summary.json").read_text())["rows"]] == [
        "given (--data)",
        "external",
    ]
    markdown = (out / "report.md").read_text()
    assert "in-source reference: none" in markdown and "| a | given (--data) |" in markdown
    assert "in-source" not in markdown.split("## a:")[1].splitlines()[0]
    assert "<td>given (--data)</td>" in (out / "report.html").read_text()


def test_a_model_giving_every_image_the_same_score_is_warned_about(runs, tmp_path):
    flat = make_run(tmp_path, "flat", "cnn1", runs["images"], zero_weights=True)
    with pytest.warns(UserWarning, match="same score"):
        report = evaluate_run(flat, n_bootstrap=20, grid_size=0, out_dir=tmp_path / "flat")
    assert report.metrics["roc_auc"].value == 0.5  # what reads like a measurement without the warning
    warning = next(w for w in report.warnings if "same score" in w)
    assert "all 8 items" in warning and "AUC is meaningless" in warning
    assert warning in (tmp_path / "flat" / "report.md").read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = evaluate_run(flat, n_bootstrap=0, grid_size=0, out_dir=tmp_path / "again")
    assert not [w for w in caught if "same score" in str(w.message)]  # once per model and process
    assert any("same score" in w for w in again.warnings)  # ... but every report says it
    ranked = evaluate_run(runs["a"], n_bootstrap=0, grid_size=0, out_dir=tmp_path / "ranked")
    assert not any("same score" in w for w in ranked.warnings)


def test_a_set_that_does_not_transfer_gets_the_fine_tuning_advice(runs, tmp_path):
    from covidscan.evaluation.transfer import EvaluationSetSpec, evaluate_sets

    home = evaluate_sets(runs["a"], [], out_dir=tmp_path / "home", n_bootstrap=30, grid_size=2)
    assert not any("model.weights=" in note for note in home.notes)  # nothing external, nothing to advise
    swapped = {"CT_COVID": "normal", "CT_NonCOVID": "COVID"}  # labels the wrong way round: cannot transfer
    summary = evaluate_sets(
        runs["a"], [EvaluationSetSpec(runs["external"], "site-b", swapped)], out_dir=tmp_path / "sets", n_bootstrap=30
    )
    assert summary.row("site-b").verdict.startswith("does not transfer")
    advice = [note for note in summary.notes if "model.weights=" in note]
    assert len(advice) == 1 and "site-b" in advice[0]
    assert "model.weights=" in (tmp_path / "sets" / "report.md").read_text()


def test_the_fine_tuning_advice_gives_the_exact_command_for_a_training_run(tmp_path):
    from covidscan.evaluation.transfer import fine_tune_advice

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    exact = fine_tune_advice(["site-b", "site-c"], str(run))
    assert "site-b, site-c" in exact
    assert f"--config {run}/config.yaml --set data.source=SITE_DATA --set model.weights={run}" in exact
    assert "--config" not in fine_tune_advice(["site-b"], str(tmp_path / "ensemble"))  # no run config to reuse


def test_cli_evaluates_several_external_sets_with_their_own_label_maps(runs, tmp_path, capsys):
    other = write_image_folder(tmp_path / "hospital-c", {"CT_COVID": 3, "CT_NonCOVID": 3}, seed=3)
    out = tmp_path / "cli"
    args = ["evaluate", "--checkpoint", str(runs["a"]), "--bootstrap", "0", "--grid-size", "0", "--out", str(out)]
    code = main(
        [
            *args,
            "--external",
            f"b={runs['external']}",
            str(other),
            "--label-map",
            "b:CT_COVID=COVID",
            "b:CT_NonCOVID=normal",
            "hospital-c:CT_COVID=COVID",
            "hospital-c:CT_NonCOVID=normal",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "in-source" in printed and "external-hospital-c" in printed and "report:" in printed
    assert {p.name for p in out.iterdir()} >= {"test", "b", "external-hospital-c", "report.html", "summary.json"}
    # the long-standing form: one --data marked --external, still compared with the run's own test split
    assert main([*args[:-1], str(tmp_path / "legacy"), "--data", str(runs["external"]), "--external",
                 "--label-map", "CT_COVID=COVID", "CT_NonCOVID=normal"]) == 0  # fmt: skip
    assert (tmp_path / "legacy" / "external-external" / "metrics.json").is_file()
    assert (tmp_path / "legacy" / "test" / "metrics.json").is_file()
    assert main([*args, "--external"]) == 2
    assert "--external needs" in capsys.readouterr().err
    assert (
        main(
            [
                *args,
                "--external",
                f"b={runs['external']}",
                f"b={other}",
                "--label-map",
                "CT_COVID=COVID",
                "CT_NonCOVID=normal",
            ]
        )
        == 2
    )
    assert "named ['b']" in capsys.readouterr().err
