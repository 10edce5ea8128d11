"""Batch prediction: CSV rows match the model, bad files become error rows, interrupted runs resume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from covidscan.cli import main
from covidscan.data import list_inputs, read_image
from covidscan.serving import load_predictor, predict_files
from helpers import CLASSES, make_checkpoint, write_image_folder


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return load_predictor(make_checkpoint(tmp_path_factory.mktemp("predict")))


@pytest.fixture
def images(tmp_path) -> Path:
    root = write_image_folder(tmp_path / "images", {"a": 5, "b": 4})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "b" / "empty.jpg").write_bytes(b"")
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_rows_match_model_and_bad_files_do_not_abort(predictor, images, tmp_path):
    summary = predict_files(predictor, [images], tmp_path / "out.csv", batch_size=4, progress=False)
    rows = read_rows(summary.out)
    assert (summary.predicted, summary.failed, summary.skipped) == (9, 2, 0)
    assert [r["path"] for r in rows] == [str(p) for p in list_inputs([images])]
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.png", "empty.jpg"} and "broken.png" in errors["broken.png"]
    good = [r for r in rows if not r["error"]]
    transform = predictor.transform
    for row in good[:3]:
        expected = predictor.predict_batch(transform(read_image(row["path"]))[None])[0]
        np.testing.assert_allclose([float(row[f"prob_{c}"]) for c in CLASSES], expected, atol=1e-5)
        assert row["predicted_label"] == CLASSES[int(np.argmax(expected))]


def test_resume_skips_finished_files_and_drops_a_partial_line(predictor, images, tmp_path, monkeypatch):
    out = tmp_path / "out.csv"
    predict_files(predictor, [images], out, batch_size=4, progress=False)
    complete = out.read_text().splitlines(keepends=True)
    out.write_text("".join(complete[:4]) + complete[4][:10])  # header + 3 rows + a row cut mid-write
    seen: list[int] = []
    original = predictor.predict_items
    monkeypatch.setattr(predictor, "predict_items", lambda views: seen.append(len(views[0])) or original(views))
    summary = predict_files(predictor, [images], out, batch_size=4, progress=False)
    assert summary.skipped == 3 and sum(seen) == summary.predicted == 9 - 3
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in list_inputs([images]))
    assert out.read_text().splitlines()[:4] == [line.rstrip("\r\n") for line in complete[:4]]


def test_existing_csv_from_another_model_is_refused(predictor, images, tmp_path):
    out = tmp_path / "out.csv"
    out.write_text("path,predicted_label,prob_x,error\n")
    with pytest.raises(ValueError, match="another --out"):
        predict_files(predictor, [images], out, progress=False)


def test_worker_processes_give_the_same_rows(predictor, images, tmp_path):
    single = read_rows(predict_files(predictor, [images], tmp_path / "a.csv", batch_size=3, progress=False).out)
    workers = read_rows(
        predict_files(predictor, [images], tmp_path / "b.csv", batch_size=3, num_workers=2, progress=False).out
    )
    assert single == workers


def test_cli_predict(predictor, images, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    run_dir = predictor.run_dir
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(images / "a"), "--out", str(out)]) == 0
    assert "5 predicted" in capsys.readouterr().out and len(read_rows(out)) == 5
    assert main(["predict", "--input", str(images)]) == 2  # neither --checkpoint nor --onnx
