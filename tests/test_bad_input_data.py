"""Hostile and broken input against the data layer and the batch commands, as a new user meets it.

The corpus is generated here (tests/helpers.py): a decompression-bomb PNG header, a truncated JPEG,
a float TIFF with NaN, DICOMs whose RescaleSlope is NaN or 'abc', a folder mixing two DICOM series,
manifests with duplicates, conflicting labels, NaN labels and missing patient ids. Documented
behaviour: a refusal is exit code 2 with one line naming the file and the fix (no traceback);
batch commands (predict, explain, evaluate, train with skip_bad, data audit) go on past bad files
and list them; nothing is written by a command that refuses. The HTTP side of this corpus is in
the serving tests.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from covidscan.cli import main
from covidscan.data import DataWarning, Sample, checks, load_samples
from covidscan.data.checks import verify_readable
from covidscan.data.synthetic import write_dicom_slice
from helpers import (
    bomb_png_bytes,
    make_checkpoint,
    truncated_jpeg_bytes,
    write_dicom_with_slope,
    write_exif_rotated_jpeg,
    write_image_folder,
    write_nan_tiff,
)

BAD_FILES = ("bomb.png", "cut.jpg", "nan.tif", "slope-nan.dcm", "slope-abc.dcm")


def add_bad_files(folder: Path) -> Path:
    """One of each bad 2D file into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bomb.png").write_bytes(bomb_png_bytes(30000))
    (folder / "cut.jpg").write_bytes(truncated_jpeg_bytes())
    write_nan_tiff(folder / "nan.tif")
    write_dicom_with_slope(folder / "slope-nan.dcm", b"NaN")
    write_dicom_with_slope(folder / "slope-abc.dcm", b"abc")
    return folder


def refused(capsys, argv: list[str], *names: str) -> str:
    """Run the CLI expecting a one-line refusal (exit 2) that names every one of ``names``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and "%|" not in line]  # not progress bars
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"covidscan {argv[0]}: error: "), err
    for name in names:
        assert name in lines[0], err
    return lines[0]


@pytest.fixture
def mixed_folder(tmp_path):
    """A class-folder dataset: 8 good images per class, the bad corpus among the COVID ones."""
    root = write_image_folder(tmp_path / "data", {"COVID": 8, "normal": 8}, size=16)
    add_bad_files(root / "COVID")
    return root


def test_loading_refuses_bad_files_naming_them_or_skips_and_lists_them(mixed_folder, capsys, tmp_path):
    # headers are checked on loading: the bomb and the bad rescale values are refused before anything runs
    err = refused(
        capsys, ["data", "info", str(mixed_folder)], "3 unreadable file(s)", "bomb.png", "slope-abc.dcm", "--skip-bad"
    )
    assert "declared image size is too large" in err and "slope-nan.dcm: RescaleSlope is nan" in err
    out = tmp_path / "splits.csv"
    refused(capsys, ["data", "split", str(mixed_folder), "--out", str(out)], "bomb.png")
    assert not out.exists()  # nothing written by a refused command
    data = load_samples(mixed_folder, skip_bad=True)  # skip_bad decodes every file: all five are found
    reasons = {Path(path).name: reason for path, reason in data.skipped}
    assert set(reasons) == set(BAD_FILES) and len(data.samples) == 16
    assert "declared image size is too large" in reasons["bomb.png"]
    assert "truncated" in reasons["cut.jpg"]
    assert "NaN" in reasons["nan.tif"]
    assert "RescaleSlope is nan" in reasons["slope-nan.dcm"]
    assert "RescaleSlope 'abc' is not a number" in reasons["slope-abc.dcm"]  # never a bare float() error
    assert main(["data", "info", str(mixed_folder), "--skip-bad"]) == 0
    assert "skipped:  5" in capsys.readouterr().out


def test_files_checked_in_worker_processes_give_the_same_verdicts(mixed_folder, monkeypatch):
    samples = [Sample(str(path), None) for path in sorted(mixed_folder.rglob("*.*"))]
    serial = verify_readable(samples, decode=True, progress=False, workers=1)
    monkeypatch.setattr(checks, "PARALLEL_MIN_FILES", 2)
    assert verify_readable(samples, decode=True, progress=False, workers=2) == serial
    assert {Path(path).name for path, _ in serial[1]} == set(BAD_FILES) and len(serial[0]) == 16


def test_predict_writes_an_error_row_per_bad_file_and_no_nan(mixed_folder, tmp_path, capsys):
    run = make_checkpoint(tmp_path, size=32, channels=1)
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(run), "--input", str(mixed_folder), "--out", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert len(rows) == 21  # every file has a row: one bad file does not end the batch
    for name in BAD_FILES:
        assert rows[name]["error"] and not rows[name]["predicted_label"], rows[name]
    probabilities = [float(v) for r in rows.values() for k, v in r.items() if k.startswith("prob_") and v]
    assert len(probabilities) == 16 * 2 and all(math.isfinite(p) for p in probabilities)


def test_explain_goes_on_past_bad_files(mixed_folder, tmp_path, capsys):
    run = make_checkpoint(tmp_path, size=32, channels=1)
    inputs = [str(mixed_folder / "COVID" / name) for name in (*BAD_FILES, "COVID (0).png")]
    out = tmp_path / "cams"
    assert main(["explain", "--checkpoint", str(run), "--input", *inputs, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(name in err for name in BAD_FILES)
    assert (out / "COVID (0).png").is_file() and len(list(csv.DictReader((out / "explanations.csv").open()))) == 1


def test_evaluate_leaves_out_bad_files_and_lists_them(mixed_folder, tmp_path, capsys):
    run = make_checkpoint(tmp_path, size=32, channels=1)
    argv = ["evaluate", "--checkpoint", str(run), "--data", str(mixed_folder), "--external", "--bootstrap", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads(next((run / "evaluation").glob("*/metrics.json")).read_text())
    assert metrics["n_items"] == 16
    assert {Path(item["path"]).name for item in metrics["skipped"]} == set(BAD_FILES)
    assert any("could not be read" in warning for warning in metrics["warnings"])


def tiny_train_config(tmp_path: Path, source: Path, skip_bad: bool) -> Path:
    config = tmp_path / f"train-{skip_bad}.yaml"
    config.write_text(
        f"name: bad\noutput_dir: {tmp_path / 'runs'}\n"
        f"data: {{source: {source}, image_size: 16, channels: 1, normalize: none, skip_bad: {str(skip_bad).lower()},"
        " split: {method: stratified, ratios: [0.75, 0.25, 0.0]}}\n"
        "model: {name: cnn1}\ntraining: {batch_size: 8, phases: [{epochs: 1, lr: 0.001}]}\n"
    )
    return config


def test_train_skip_bad_skips_a_truncated_jpeg_and_lists_it(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", {"COVID": 6, "normal": 6}, size=16)
    (root / "COVID" / "cut.jpg").write_bytes(truncated_jpeg_bytes())
    refused(capsys, ["train", "--config", str(tiny_train_config(tmp_path, root, False))], "cut.jpg", "--skip-bad")
    assert main(["train", "--config", str(tiny_train_config(tmp_path, root, True))]) == 0, capsys.readouterr().err
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "skipped.json").is_file()]
    skipped = json.loads((run / "skipped.json").read_text())
    assert [Path(item["path"]).name for item in skipped] == ["cut.jpg"] and "truncated" in skipped[0]["reason"]
    assert "cut.jpg" not in (run / "splits.csv").read_text()


def test_train_refuses_a_bomb_before_writing_anything(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", {"COVID": 6, "normal": 6}, size=16)
    (root / "normal" / "bomb.png").write_bytes(bomb_png_bytes(30000))
    refused(capsys, ["train", "--config", str(tiny_train_config(tmp_path, root, False))], "bomb.png", "--skip-bad")
    assert not (tmp_path / "runs").exists()  # the data is checked before the run directory is made


def test_data_audit_reports_bad_files_and_goes_on(mixed_folder, tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["data", "audit", str(mixed_folder), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {Path(item["path"]).name for item in report["unreadable"]} == set(BAD_FILES)


def test_a_folder_mixing_two_series_is_refused_naming_both_uids(tmp_path, capsys):
    root = tmp_path / "scans"
    for number, label in enumerate(("COVID", "normal"), start=1):
        series = root / label / f"{label}-p1"
        series.mkdir(parents=True)
        for k in range(3):
            write_dicom_slice(series / f"{k}.dcm", np.zeros((8, 8)) - 900.0, 2.0 * k, series_uid=f"1.2.{number}")
    for k in range(2):  # a second series dropped into one patient's folder
        write_dicom_slice(root / "COVID" / "COVID-p1" / f"x{k}.dcm", np.zeros((8, 8)), 5.0 + k, series_uid="1.9.9")
    err = refused(capsys, ["data", "info", str(root)], "COVID-p1", "1.2.1 (3 files)", "1.9.9 (2 files)")
    assert "one series per folder" in err


def test_exif_orientation_is_what_the_audit_and_the_model_see(tmp_path):
    from covidscan.data import Sample, read_image
    from covidscan.data.audit import inspect_sample

    upright = write_exif_rotated_jpeg(tmp_path / "photo.jpg")  # stored 48 x 24, shown 24 x 48
    assert read_image(tmp_path / "photo.jpg").shape == upright.shape == (48, 24)
    assert inspect_sample(Sample(str(tmp_path / "photo.jpg"), "COVID")).size == "24x48"


def write_manifest(folder: Path, rows: list[str]) -> Path:
    write_image_folder(folder, {"COVID": 4, "normal": 4}, size=16)
    manifest = folder / "meta.csv"
    manifest.write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    return manifest


def good_rows() -> list[str]:
    return [f"{label}/{label} ({i}).png,{label},{label}-p{i // 2}" for label in ("COVID", "normal") for i in range(4)]


def test_duplicate_rows_relative_or_absolute_are_dropped_with_a_warning(tmp_path, capsys):
    folder = tmp_path / "data"
    duplicate = f"{(folder / 'COVID' / 'COVID (0).png').resolve()},COVID,COVID-p0"  # the same file, spelled absolute
    manifest = write_manifest(folder, [*good_rows(), duplicate, "normal/normal (1).png,normal,normal-p0"])
    with pytest.warns(DataWarning, match=r"2 duplicate row\(s\).*meta\.csv line 10, meta\.csv line 11"):
        data = load_samples(manifest)
    assert len(data.samples) == 8 and [i.kind for i in data.issues] == ["duplicate"]
    assert main(["data", "info", str(manifest)]) == 0
    assert "warning:  2 duplicate row(s)" in capsys.readouterr().out


def test_one_path_with_two_labels_is_refused_naming_the_rows(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "data", [*good_rows(), "COVID/COVID (1).png,normal,x"])
    refused(
        capsys,
        ["data", "info", str(manifest)],
        "COVID (1).png",
        "'COVID' (meta.csv line 3)",
        "'normal' (meta.csv line 10)",
    )
    data = load_samples(manifest, skip_bad=True)
    assert len(data.samples) == 7 and all("conflicting labels" in reason for _, reason in data.skipped)


@pytest.mark.parametrize("missing", ["", "NaN", "nan", "NA", "null"])
def test_nan_or_empty_labels_never_become_a_class(tmp_path, capsys, missing):
    manifest = write_manifest(tmp_path / "data", [*good_rows()[:7], f"normal/normal (3).png,{missing},normal-p1"])
    refused(capsys, ["data", "info", str(manifest)], "no label", "meta.csv line 9", "--skip-bad")
    data = load_samples(manifest, skip_bad=True)
    assert data.class_names == ["COVID", "normal"] and len(data.samples) == 7
    assert load_samples(manifest, require_labels=False).samples[-1].label is None  # prediction-only use


def test_missing_patient_ids_in_a_grouped_manifest_are_warned_with_rows(tmp_path, capsys):
    rows = good_rows()
    rows[2] = rows[2].rsplit(",", 1)[0] + ","
    rows[5] = rows[5].rsplit(",", 1)[0] + ",nan"
    manifest = write_manifest(tmp_path / "data", rows)
    with pytest.warns(DataWarning, match=r"2 of 8 rows have no patient_id .*meta\.csv line 4, meta\.csv line 7"):
        data = load_samples(manifest)
    assert [i.kind for i in data.issues] == ["missing_patient_id"]
    out = tmp_path / "audit.json"
    assert main(["data", "audit", str(manifest), "--out", str(out)]) == 0
    assert "2 of 8 rows have no patient_id" in capsys.readouterr().out
    assert json.loads(out.read_text())["manifest_issues"][0]["kind"] == "missing_patient_id"


def test_train_and_evaluate_surface_manifest_warnings(tmp_path):
    manifest = write_manifest(tmp_path / "data", [*good_rows(), good_rows()[0]])
    with pytest.warns(DataWarning, match="duplicate"):
        assert main(["train", "--config", str(tiny_train_config(tmp_path, manifest, False))]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "splits.csv").read_text().count("COVID (0).png") == 1  # the duplicate cannot reach two splits
    with pytest.warns(DataWarning, match="duplicate"):
        assert main(["evaluate", "--checkpoint", str(run), "--data", str(manifest), "--bootstrap", "0"]) == 0


def test_a_bad_file_met_in_a_dataloader_worker_is_still_one_line(tmp_path):
    """torch re-raises a worker's DataError with the worker's traceback as its text; the message stays one line."""
    from torch.utils.data import DataLoader

    from covidscan.config import config_from_dict
    from covidscan.data import DataError, Sample, build_dataset

    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated_jpeg_bytes())
    config = config_from_dict({"data": {"image_size": 16, "channels": 1}}).data
    dataset = build_dataset(config, [Sample(str(path), "COVID")], ["COVID", "normal"], train=False)
    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(dataset, num_workers=1)))
    message = str(caught.value)
    assert message.startswith(f"{path}: unreadable or corrupt image") and "\n" not in message
    assert "Traceback" in caught.value.worker_traceback
