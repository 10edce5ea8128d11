"""DICOM result objects: the SR says what the model said (probabilities, verdict, rule, provenance,
notice) in the source study, and the Secondary Capture carries the overlay with a burned-in notice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")
import pydicom
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from covidscan.data.synthetic import write_dicom_series
from covidscan.inference import ModelCard
from covidscan.notices import RESEARCH_USE_NOTICE
from covidscan.serving.dicom_results import (
    EvidenceUnit,
    StudyFindings,
    build_result_objects,
    patient_orientation,
    read_study_report,
)

CLASSES = ["COVID", "normal"]


def card() -> ModelCard:
    return ModelCard(
        model_id="cnn1-test-run",
        architecture="cnn1",
        class_names=CLASSES,
        input_size=32,
        channels=1,
        normalize="none",
        head="softmax",
        checkpoint_sha256="0123456789abcdef" * 4,
        epoch=3,
    )


@pytest.fixture
def series(tmp_path: Path) -> list[pydicom.Dataset]:
    hu = np.random.default_rng(0).integers(-1000, 400, (5, 24, 24)).astype(float)
    files = write_dicom_series(tmp_path / "series", hu, file_order=[3, 0, 4, 1, 2])
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def findings(series, probabilities=(0.7, 0.3)) -> StudyFindings:
    units = [
        EvidenceUnit(f"slice {i}", [0.2 + 0.1 * i, 0.8 - 0.1 * i], [str(ds.SOPInstanceUID)])
        for i, ds in enumerate(series)
    ]
    return StudyFindings(CLASSES, list(probabilities), "mean of 5 slice probabilities", units, card())


def test_sr_reports_probabilities_rule_provenance_and_notice_in_the_source_study(series, tmp_path):
    overlay = np.zeros((40, 50, 3), np.uint8)
    objects = build_result_objects(findings(series), series, overlay)
    sr, sc = objects.structured_report, objects.overlay
    assert [ds.SOPClassUID for ds in objects.datasets] == [SecondaryCaptureImageStorage, ComprehensiveSRStorage]
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == series[0].StudyInstanceUID
        assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in series}
        assert ds.PatientID == series[0].PatientID and ds.ContentQualification == "RESEARCH"
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID

    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)  # a valid Part 10 file, read back from disk
    report = read_study_report(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert report["probabilities"] == pytest.approx({"COVID": 0.7, "normal": 0.3})
    assert report["finding"] == "COVID-19"  # SNOMED CT 840539006 for the class named COVID
    assert report["algorithm"]["name"] == "cnn1-test-run"
    assert report["algorithm"]["version"] == card().version
    assert report["algorithm"]["parameters"]["checkpoint_sha256"] == card().checkpoint_sha256
    assert report["algorithm"]["parameters"]["aggregation"] == "mean of 5 slice probabilities"
    assert report["texts"] == {"Aggregation rule": "mean of 5 slice probabilities", "Comment": RESEARCH_USE_NOTICE}
    assert report["units"]["slice 4"] == pytest.approx({"COVID": 0.6, "normal": 0.4})
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for item in s.ReferencedSOPSequence
    }
    assert {str(ds.SOPInstanceUID) for ds in series} | {sc.SOPInstanceUID} <= evidence


def test_secondary_capture_shows_the_key_slice_with_a_burned_in_notice(series):
    overlay = np.full((40, 50, 3), 128, np.uint8)
    sc = build_result_objects(findings(series), series, overlay).overlay
    # the key slice is the one with the highest probability of the predicted class (COVID: slice 4)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == series[4].SOPInstanceUID
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    assert sc.BurnedInAnnotation == "YES" and "RESEARCH USE ONLY" in sc.ImageComments
    assert card().version in sc.ImageComments
    pixels = sc.pixel_array
    assert pixels.shape[1:] == (50, 3) and pixels.shape[0] > 40  # the banner sits above the overlay
    assert np.array_equal(pixels[-40:], overlay)
    assert (pixels[:-40] != 0).any()  # text drawn into the banner
    assert list(sc.PatientOrientation) == ["L", "P"]


def test_without_overlay_only_the_report_is_built(series):
    objects = build_result_objects(findings(series), series)
    assert objects.overlay is None and len(objects.datasets) == 1


@pytest.mark.parametrize(
    "probabilities, match",
    [((0.5,), "one value per class"), ((float("nan"), 0.5), "non-finite")],
)
def test_refuses_inconsistent_or_non_finite_findings(series, probabilities, match):
    with pytest.raises(ValueError, match=match):
        build_result_objects(findings(series, probabilities), series)


def test_refuses_units_that_reference_unknown_instances(series):
    with pytest.raises(ValueError, match="not among the source headers"):
        build_result_objects(findings(series), series[:2])


def test_private_class_names_are_coded_in_the_declared_private_scheme(series):
    units = [EvidenceUnit("slice 0", [0.1, 0.9], [str(series[0].SOPInstanceUID)])]
    result = StudyFindings(["COVID", "ground-glass"], [0.1, 0.9], "max", units, card())
    sr = build_result_objects(result, series).structured_report
    assert read_study_report(sr)["finding"] == "ground-glass"
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99COVIDSCAN"


@pytest.mark.parametrize(
    "orientation, letters",
    [([1, 0, 0, 0, 1, 0], ("L", "P")), ([1, 0, 0, 0, 0, -1], ("L", "F")), ([0, 1, 0, 0, 0, -1], ("P", "F"))],
)
def test_patient_orientation_letters(orientation, letters):
    ds = pydicom.Dataset()
    ds.ImageOrientationPatient = orientation
    assert patient_orientation(ds) == letters
