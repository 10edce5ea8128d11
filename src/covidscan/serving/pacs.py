"""A study from a PACS to a verdict and back: ``covidscan predict --dicomweb URL --study UID``.

Choose the study's axial CT series from its DICOMweb metadata (:func:`covidscan.serving.dicomweb.choose_series`,
the rule used for files), fetch it into a temporary folder, predict it with
:func:`covidscan.inference.predict_study` (the study path of ``covidscan predict`` and ``POST
/v1/studies``), build the DICOM result objects
(SR + CAM overlay SC), write them and a JSON summary under ``out_dir``, and store them back in the PACS
only when asked (``store=True``): nothing is written to a patient's record by default.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidscan.data import LUNG_WINDOW
from covidscan.inference import Predictor, StudyPrediction, predict_study
from covidscan.serving import dicomweb
from covidscan.serving.dicom_results import (
    EvidenceUnit,
    ResultObjects,
    StudyFindings,
    build_result_objects,
    png_to_rgb,
)
from covidscan.serving.studies import StudySlices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PacsResult:
    study_instance_uid: str
    prediction: StudyPrediction
    summary: dict[str, Any]
    files: list[Path]  # the DICOM objects and summary written under out_dir
    stored: list[str]  # SOP Instance UIDs the PACS acknowledged (empty unless store=True)


def aggregation_rule(prediction: StudyPrediction) -> str:
    """The rule in words, e.g. ``mean of 37 slice probabilities (every 2nd slice)``."""
    used = sum(item.probabilities is not None for item in prediction.items)
    rule = f"{prediction.aggregation} of {used} {prediction.unit} probabilities"
    return rule + (f" (every {prediction.every}th slice)" if prediction.every > 1 else "")


def result_objects(
    predictor: Predictor, prediction: StudyPrediction, slices: StudySlices, *, overlay: bool = True
) -> ResultObjects:
    """SR (+ SC of the key slice's CAM overlay when a 2D model can explain) for a predicted DICOM study."""
    import pydicom

    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in slices.header.files]
    uids = [str(ds.SOPInstanceUID) for ds in headers]
    usable = [item for item in prediction.items if item.probabilities is not None]
    units = [
        EvidenceUnit(
            f"{prediction.unit} {item.index}"
            if item.last_index == item.index
            else f"{prediction.unit}s {item.index}-{item.last_index}",
            item.probabilities or [],
            uids[item.index : item.last_index + 1],
        )
        for item in usable
    ]
    findings = StudyFindings(
        class_names=prediction.class_names,
        probabilities=[prediction.probabilities[name] for name in prediction.class_names],
        aggregation=aggregation_rule(prediction),
        units=units,
        model=predictor.card,
        parameters={"series selection": str(prediction.series.get("selection", ""))},
    )
    rgb = None
    if overlay and units and predictor.explainable and predictor.spatial_dims == 2:
        from covidscan.explain import explain_image

        key = usable[findings.key_index]
        window = predictor.members[0].preprocessing.window or LUNG_WINDOW
        pixels = slices.windowed((key.index + key.last_index) // 2, window)
        rgb = png_to_rgb(explain_image(predictor, pixels).overlay_png_bytes)
    return build_result_objects(findings, headers, rgb)


def predict_pacs_study(
    predictor: Predictor,
    url: str,
    study_uid: str,
    out_dir: str | Path,
    *,
    series_uid: str | None = None,
    store: bool = False,
    **options: Any,
) -> PacsResult:
    """Predict a study held by a DICOMweb server; ``options`` go to :func:`predict_study`
    (``every``, ``aggregation``, ``top_k``). See the module docstring."""
    client = dicomweb.connect(url)
    chosen = dicomweb.choose_series(client, study_uid, series_uid)
    out = Path(out_dir) / study_uid
    with tempfile.TemporaryDirectory(prefix="covidscan-dicomweb-") as folder:
        dicomweb.fetch_series(client, study_uid, chosen.series_instance_uid, folder)
        prediction = predict_study(predictor, Path(folder), **options)
        prediction.series["selection"] = chosen.reason  # chosen on the server, by the same rule as for files
        slices = StudySlices(prediction, Path(folder), predictor.config.data.limits)
        objects = result_objects(predictor, prediction, slices)
    log.info("study %s: %s", study_uid, prediction.series.get("selection"))
    summary = {
        **prediction.to_dict(),
        "study": study_uid,  # not the URL, which may hold credentials
        "name": study_uid,
        "result_objects": {
            "structured_report": objects.structured_report.SOPInstanceUID,
            "overlay": objects.overlay.SOPInstanceUID if objects.overlay is not None else None,
        },
        "stored_in_pacs": store,
    }
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, ds in (("structured-report.dcm", objects.structured_report), ("overlay.dcm", objects.overlay)):
        if ds is not None:
            ds.save_as(out / name, enforce_file_format=True)
            files.append(out / name)
    stored = dicomweb.store_results(client, objects.datasets) if store else []
    summary["stored_sop_instance_uids"] = stored
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    files.append(out / "summary.json")
    return PacsResult(study_uid, prediction, summary, files, stored)
