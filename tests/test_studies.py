"""Study-level prediction: a whole CT study in, one verdict out, its rule and evidence recorded."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from covidscan.cli import main
from covidscan.data import DataError, Sample, ZipLimits, extract_zip, find_studies
from covidscan.data.synthetic import write_dicom_series
from covidscan.data.volumes import VolumeStackDataset
from covidscan.errors import UsageError
from covidscan.inference import (
    RESEARCH_USE_NOTICE,
    NonFiniteOutputError,
    Predictor,
    aggregate,
    load_predictor,
    predict_study,
)
from covidscan.serving import predict_studies
from helpers import CLASSES, make_checkpoint, registered_model, tiny3d, write_nifti

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
PATIENT_ID = "PATIENT-SECRET-42"


def volume(slices: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """HU with a bright, moving blob, so slices differ and so do their predictions."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(-700, 150, (slices, size, size))
    for k in range(slices):
        hu[k, k % size : k % size + 6, 4:10] = 200
    return np.clip(hu, -1024, 3000)


def write_series(
    folder: Path,
    slices: int,
    *,
    plane: str = "axial",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    number: int = 2,
    description: str = "CHEST 2.5",
    seed: int = 0,
    modality: str = "CT",
) -> list[Path]:
    """A CT series of one study, with the tags series selection reads (and a patient id that must not leak)."""
    files = write_dicom_series(folder, volume(slices, seed=seed), file_order=list(reversed(range(slices))))
    orientation = {"axial": [1, 0, 0, 0, 1, 0], "coronal": [1, 0, 0, 0, 0, -1]}[plane]
    for file in files:
        ds = pydicom.dcmread(file)
        ds.StudyInstanceUID = STUDY_UID
        ds.PatientID = PATIENT_ID
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = orientation
        ds.SeriesNumber = number
        ds.SeriesDescription = description
        ds.Modality = modality
        ds.save_as(file)
    return files


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return load_predictor(make_checkpoint(tmp_path_factory.mktemp("studies"), size=16))


def test_a_2d_model_predicts_every_slice_in_position_order_and_aggregates(predictor, tmp_path):
    files = write_series(tmp_path / "study", 7)
    result = predict_study(predictor, tmp_path / "study")
    by_position = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    expected = np.stack([predictor.predict_batch([v[None] for v in predictor.read(f)])[0] for f in by_position])
    actual = np.array([item.probabilities for item in result.items])
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    assert [item.index for item in result.items] == list(range(7))
    assert [item.z_mm for item in result.items] == pytest.approx([2.5 * k for k in range(7)])
    np.testing.assert_allclose(list(result.probabilities.values()), expected.mean(axis=0), atol=1e-5)
    assert result.predicted_label == CLASSES[int(np.argmax(expected.mean(axis=0)))]
    assert (result.unit, result.aggregation, result.every) == ("slice", "mean", 1)
    assert result.series["study_instance_uid"] == STUDY_UID and result.series["slices"] == 7
    assert result.series["spacing_mm"] == pytest.approx([2.5, 0.7, 0.7])
    assert result.model["model_version"] == predictor.card.version and result.model["checkpoint_sha256"]
    assert RESEARCH_USE_NOTICE in result.warnings
    assert PATIENT_ID not in json.dumps(result.to_dict())
    assert predict_study(predictor, tmp_path / "study", include_identifiers=True).series["patient_id"] == PATIENT_ID

    every = predict_study(predictor, tmp_path / "study", every=3, aggregation="max")
    assert [item.index for item in every.items] == [0, 3, 6] and every.aggregation == "max"
    np.testing.assert_allclose(list(every.probabilities.values()), aggregate(expected[[0, 3, 6]], "max"), atol=1e-5)
    assert predict_study(predictor, tmp_path / "study", aggregation="topk", top_k=2).aggregation == "top-2 mean"


def test_a_series_with_a_missing_slice_says_so_in_its_verdict(predictor, tmp_path):
    files = write_series(tmp_path / "study", 7)
    middle = sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))[3]
    middle.unlink()
    result = predict_study(predictor, tmp_path / "study")
    assert len(result.items) == 6
    assert any("uneven slice spacing" in warning for warning in result.warnings)


def test_aggregation_rules():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    np.testing.assert_allclose(aggregate(p, "mean"), [0.5, 0.5])
    np.testing.assert_allclose(aggregate(p, "max"), np.array([0.9, 0.8]) / 1.7)
    np.testing.assert_allclose(aggregate(p, "topk", 2), np.array([0.65, 0.7]) / 1.35)
    np.testing.assert_allclose(aggregate(p, "topk", 1), aggregate(p, "max"))
    with pytest.raises(UsageError, match="aggregation"):
        aggregate(p, "median")


def test_the_axial_original_ct_series_is_chosen_and_the_choice_explained(predictor, tmp_path):
    study = tmp_path / "study"
    write_series(study / "thin", 9, number=3, description="CHEST 1.25", seed=1)
    write_series(study / "thick", 4, number=2, seed=2)
    write_series(study / "coronal", 12, plane="coronal", image_type=("DERIVED", "SECONDARY"), number=5, seed=3)
    result = predict_study(predictor, study)
    assert result.series["slices"] == 9 and result.series["series_description"] == "CHEST 1.25"
    selection = result.series["selection"]
    assert "Modality CT" in selection and "axial" in selection and "the most slices (9)" in selection
    assert "'CHEST 2.5'" in selection and "coronal" in selection  # the series not chosen are named
    assert len(find_studies([study])) == 1  # three series, one StudyInstanceUID: one study


def test_a_study_without_axial_ct_is_refused_by_name(predictor, tmp_path):
    write_series(tmp_path / "s", 4, plane="coronal")
    with pytest.raises(DataError, match="none axial"):
        predict_study(predictor, tmp_path / "s")


def test_zip_of_a_series_gives_the_folders_verdict_and_hostile_zips_are_refused(predictor, tmp_path):
    write_series(tmp_path / "study", 5)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in (tmp_path / "study").iterdir():
            handle.write(file, f"DICOM/{file.name}")
    from_zip, from_folder = predict_study(predictor, archive), predict_study(predictor, tmp_path / "study")
    assert from_zip.probabilities == pytest.approx(from_folder.probabilities)
    assert from_zip.study == str(archive) and from_zip.name == "study"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as handle:
        handle.writestr("../outside.dcm", b"x")
    with pytest.raises(DataError, match="outside the archive"):
        predict_study(predictor, evil)
    with pytest.raises(DataError, match="members declare .* over the 0.00 MiB limit"):
        extract_zip(archive, tmp_path / "x", ZipLimits(max_bytes=1000))
    assert not (tmp_path / "outside.dcm").exists()


def test_study_zips_skip_system_files_and_refuse_unsafe_members_before_writing(predictor, tmp_path):
    from covidscan.data.readers import LimitError

    write_series(tmp_path / "study", 3)
    archive = tmp_path / "mac.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in (tmp_path / "study").iterdir():
            handle.write(file, f"study/{file.name}")
        handle.writestr("__MACOSX/study/._slice_0000.dcm", b"AppleDouble")
        handle.writestr("study/.DS_Store", b"finder")
    extracted = extract_zip(archive, tmp_path / "out")
    assert extracted.files == 3 and sorted(s["name"] for s in extracted.skipped) == [
        "__MACOSX/study/._slice_0000.dcm",
        "study/.DS_Store",
    ]
    result = predict_study(predictor, archive)
    assert len(result.items) == 3 and any("2 system files" in w for w in result.warnings)
    assert result.source_files == ()  # the extracted files are gone once the prediction is made

    def hostile(name: str, mode: int = 0o600, encrypted: bool = False) -> Path:
        path = tmp_path / f"hostile{len(list(tmp_path.glob('hostile*.zip')))}.zip"
        with zipfile.ZipFile(path, "w") as handle:
            member = zipfile.ZipInfo(name)
            member.external_attr = mode << 16
            handle.writestr(member, b"x" * 10)
        if encrypted:  # zipfile cannot write encrypted members: set the flag in the central directory
            data = bytearray(path.read_bytes())
            data[data.index(b"PK\x01\x02") + 8] |= 0x1
            path.write_bytes(bytes(data))
        return path

    for path, reason in (
        (hostile("/etc/passwd"), "absolute path"),
        (hostile("C:/evil.dcm"), "absolute path"),
        (hostile("link.dcm", mode=0o120777), "symbolic link"),
        (hostile("secret.dcm", encrypted=True), "encrypted"),
    ):
        with pytest.raises(DataError, match=reason):
            extract_zip(path, tmp_path / "refused")
    with pytest.raises(LimitError, match="2-file limit"):
        extract_zip(archive, tmp_path / "refused", ZipLimits(max_members=2))
    assert not (tmp_path / "refused").exists()  # every refusal came before a byte was written


def test_a_folder_of_slice_images_is_a_study(predictor, tmp_path):
    from PIL import Image

    folder = tmp_path / "slices"
    folder.mkdir()
    for k in (1, 2, 10):  # natural order: 1, 2, 10
        Image.fromarray(np.full((20, 20), 20 * k, np.uint8)).save(folder / f"slice{k}.png")
    result = predict_study(predictor, folder)
    expected = [
        predictor.predict_batch([v[None] for v in predictor.read(folder / f"slice{k}.png")])[0] for k in (1, 2, 10)
    ]
    np.testing.assert_allclose([i.probabilities for i in result.items], expected, atol=1e-5)
    assert result.series["spacing_mm"] is None and result.items[0].z_mm is None


def test_a_3d_model_predicts_the_stacks_of_its_training_pipeline(tmp_path):
    data = {"spatial_dims": 3, "depth": 4, "normalize": "sample", "volume": {"stride": 3}}
    nifti = write_nifti(tmp_path / "scan.nii.gz", slices=10)
    with registered_model("tiny3d_studies", tiny3d, spatial_dims=3):
        predictor = load_predictor(make_checkpoint(tmp_path, model="tiny3d_studies", size=16, data=data))
        result = predict_study(predictor, nifti, every=2, aggregation="max")
        dataset = VolumeStackDataset([Sample(str(nifti), None)], [], predictor.config.data, train=False)
        stacks = torch.stack([dataset[i][0] for i in range(len(dataset))])
        expected = predictor.predict_batch(stacks)
    assert result.unit == "stack" and result.every == 1 and any("applies to 2D" in w for w in result.warnings)
    assert [(i.index, i.last_index) for i in result.items] == [(0, 3), (3, 6), (6, 9)]
    np.testing.assert_allclose([i.probabilities for i in result.items], expected, atol=1e-5)
    np.testing.assert_allclose(list(result.probabilities.values()), aggregate(expected, "max"), atol=1e-5)
    assert result.series["orientation"] is None and result.series["slices"] == 10


def test_items_with_non_finite_output_are_left_out_and_none_usable_is_refused(tmp_path):
    from torch import nn

    from covidscan.config import config_from_dict

    class NanOnOddSlices(nn.Module):
        def __init__(self, all_nan: bool) -> None:
            super().__init__()
            self.linear, self.all_nan, self.calls = nn.Linear(1, 2), all_nan, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.linear(x.mean(dim=(1, 2, 3))[:, None])
            odd = torch.arange(len(x)) % 2 == 1
            return torch.where((odd | self.all_nan)[:, None], torch.full_like(logits, float("nan")), logits)

    config = config_from_dict({"data": {"image_size": 16, "channels": 1, "normalize": "none"}})
    write_series(tmp_path / "s", 4)
    result = predict_study(Predictor.from_model(NanOnOddSlices(False), config, CLASSES), tmp_path / "s", batch_size=4)
    assert [i.probabilities is None for i in result.items] == [False, True, False, True]
    assert any("2 of 4 slices gave a non-finite" in w for w in result.warnings)
    assert all(np.isfinite(list(result.probabilities.values())))
    with pytest.raises(NonFiniteOutputError):
        predict_study(Predictor.from_model(NanOnOddSlices(True), config, CLASSES), tmp_path / "s")


def test_cli_writes_one_row_per_study_a_per_slice_csv_and_resumes(predictor, tmp_path, capsys):
    root = tmp_path / "studies"
    for name, seed in (("a", 1), ("b", 2)):
        files = write_series(root / name, 3 + seed, seed=seed)
        for file in files:  # one StudyInstanceUID per study
            ds = pydicom.dcmread(file)
            ds.StudyInstanceUID = f"{STUDY_UID}.{seed}"
            ds.save_as(file)
    (root / "c").mkdir()
    (root / "c" / "broken.dcm").write_bytes(b"not dicom at all")
    out, slices = tmp_path / "studies.csv", tmp_path / "slices.csv"
    run = ["predict", "--checkpoint", str(predictor.run_dir), "--input", str(root / "a"), str(root / "b")]
    assert main([*run, "--out", str(out), "--per-slice", str(slices)]) == 0  # DICOM folders: studies by default
    assert "2 studies predicted" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert [r["study"] for r in rows] == [str(root / "a"), str(root / "b")]
    assert all(r["predicted_label"] in CLASSES and "Research use only" in r["warnings"] for r in rows)
    assert [r["n_items"] for r in rows] == ["4", "5"] and all(r["aggregation"] == "mean" for r in rows)
    assert len(list(csv.DictReader(slices.open()))) == 9
    assert PATIENT_ID not in out.read_text() + slices.read_text()

    lines = slices.read_text().splitlines(keepends=True)
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:2]))  # study b's row lost: interrupted
    slices.write_text("".join(lines[:-2]))  # and part of its slices
    summary = predict_studies(predictor, [root / "a", root / "b"], out, per_slice=slices, progress=False)
    assert (summary.predicted, summary.skipped) == (1, 1)
    assert slices.read_text() == "".join(lines)  # b's slices redone whole, a's kept once

    bad = predict_studies(predictor, [root / "c"], tmp_path / "bad.csv", progress=False)
    (row,) = list(csv.DictReader((tmp_path / "bad.csv").open()))
    assert bad.failed == 1 and "broken.dcm" in row["error"] and row["predicted_label"] == ""


@pytest.mark.integration
def test_real_dicom_series_of_covid_ct_md_sample(predictor, shared_datasets, tmp_path):
    series = shared_datasets / "covid-ct-md-sample" / "COVID-19" / "P001"
    result = predict_study(predictor, series, every=4)
    count = len(list(series.glob("*.dcm")))
    assert result.series["slices"] == count and len(result.items) == len(range(0, count, 4))
    assert result.series["modality"] == "CT" and result.series["orientation"] == "axial"
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert len(find_studies([shared_datasets / "covid-ct-md-sample"])) == 6


def test_a_3d_model_explains_the_chosen_series_of_a_zipped_study(tmp_path):
    from covidscan.explain import explain_files, explain_image

    study = tmp_path / "study"
    write_series(study / "axial", 6, seed=1)
    write_series(study / "coronal", 9, plane="coronal", image_type=("DERIVED", "SECONDARY"), number=4, seed=2)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in sorted(study.rglob("*.dcm")):
            handle.write(file, file.relative_to(study))
    data = {"spatial_dims": 3, "depth": 4, "normalize": "sample"}
    with registered_model("tiny3d_explain", tiny3d, spatial_dims=3):
        predictor = load_predictor(make_checkpoint(tmp_path, model="tiny3d_explain", size=16, data=data))
        explanation = explain_image(predictor, archive)
        assert explanation.map.shape == (6, 16, 16)  # the 6-slice axial series, not the coronal one
        _, failures = explain_files(predictor, [archive, study / "axial"], tmp_path / "out", progress=False)
    assert not failures and sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["axial.png", "study.png"]
