"""A study's prediction as DICOM objects a PACS stores: a Structured Report and a Secondary Capture.

Built with highdicom (the field's library for DICOM SR / SC encoding) rather than by hand:

- **Structured Report** (Comprehensive SR, TID 1500 *Imaging Measurement Report*): one measurement
  group (TID 1501) for the study verdict, with a NUM item per class probability, the predicted class
  as a coded *Finding* and the model as *Algorithm Identification* (TID 4019: model id, version,
  checkpoint SHA-256, aggregation rule); then one group per slice or stack with its probabilities and
  references to the slices it covers; then a *Qualitative Evaluations* container with the
  aggregation rule and the research-use notice as text, and a reference to the overlay image.
- **Secondary Capture** (RGB): the CAM overlay of the slice that best shows the verdict, with a
  burned-in banner naming the model and the research-use notice (a viewer shows pixels, not SR text).

Both join the *source* study (its Study Instance UID and patient module, copied by highdicom from
the source headers), each in a new series, with Content Qualification ``RESEARCH``. Class names are
coded with SNOMED CT where one of a few well-known names matches, and otherwise in the private coding
scheme ``99COVIDSCAN`` (declared in the objects), as DICOM allows for local concepts.

:func:`read_study_report` parses such an SR back (tests, and users checking what was stored).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from covidscan import __version__
from covidscan.notices import RESEARCH_USE_NOTICE
from covidscan.optional import optional_import

if TYPE_CHECKING:
    from covidscan.inference import ModelCard

PRIVATE_SCHEME = "99COVIDSCAN"
MANUFACTURER = "covidscan"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902  # high numbers: sorted after the scanner's series
SR_SERIES_DESCRIPTION = "covidscan AI result (research use only)"
SC_SERIES_DESCRIPTION = "covidscan CAM overlay (research use only)"

# Well-known class names -> SNOMED CT; anything else gets a private code named after the class.
_SNOMED_CLASSES = {
    "covid": ("840539006", "COVID-19"),
    "covid-19": ("840539006", "COVID-19"),
    "covid19": ("840539006", "COVID-19"),
    "normal": ("17621005", "Normal"),
    "cap": ("385093006", "Community acquired pneumonia"),
    "community-acquired pneumonia": ("385093006", "Community acquired pneumonia"),
}


@dataclass(frozen=True)
class EvidenceUnit:
    """One slice or stack the model saw: its probabilities and the source instances it covers."""

    name: str  # "slice 12" / "slices 8-11": the tracking identifier shown by viewers
    probabilities: Sequence[float]  # ordered as the class names
    source_sop_instance_uids: Sequence[str]


@dataclass(frozen=True)
class StudyFindings:
    """What the DICOM objects report: the verdict, its rule, per-unit evidence and the model."""

    class_names: Sequence[str]
    probabilities: Sequence[float]  # study level, ordered as the class names
    aggregation: str  # the rule that made the study probabilities, e.g. "mean over 37 slices"
    units: Sequence[EvidenceUnit]
    model: ModelCard  # provenance: model id, architecture, version, checkpoint hash
    key_unit: int | None = None  # the unit whose overlay is captured; default: highest predicted probability
    parameters: dict[str, str] = field(default_factory=dict)  # more algorithm parameters worth recording

    @property
    def predicted_label(self) -> str:
        return self.class_names[int(np.argmax(self.probabilities))]

    @property
    def key_index(self) -> int:
        if self.key_unit is not None:
            return self.key_unit
        predicted = int(np.argmax(self.probabilities))
        return int(np.argmax([unit.probabilities[predicted] for unit in self.units]))


@dataclass(frozen=True)
class ResultObjects:
    """The DICOM instances to store, in the order to store them (the SR references the SC)."""

    structured_report: Any  # highdicom.sr.ComprehensiveSR
    overlay: Any | None  # highdicom.sc.SCImage

    @property
    def datasets(self) -> list[Any]:
        return [ds for ds in (self.overlay, self.structured_report) if ds is not None]


def class_concept(name: str):
    """The coded concept for a class name: SNOMED CT when well known, else a private code."""
    hd = optional_import("highdicom", extra="pacs")

    known = _SNOMED_CLASSES.get(name.strip().lower())
    if known:
        return hd.sr.CodedConcept(value=known[0], scheme_designator="SCT", meaning=known[1])
    return hd.sr.CodedConcept(value=name, scheme_designator=PRIVATE_SCHEME, meaning=name)


def _private(value: str, meaning: str):
    hd = optional_import("highdicom", extra="pacs")

    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


def _probability_concept(class_name: str):
    return _private(f"P({class_name})", f"Probability of {class_name}")


AGGREGATION_CONCEPT = ("AGGREGATION", "Aggregation rule")
UMLS_QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS", "Qualitative Evaluations")


def _algorithm(findings: StudyFindings):
    hd = optional_import("highdicom", extra="pacs")

    card = findings.model
    parameters = {
        "checkpoint_sha256": card.checkpoint_sha256,
        "architecture": card.architecture,
        "aggregation": findings.aggregation,
        **findings.parameters,
    }
    return hd.sr.AlgorithmIdentification(
        name=card.model_id,
        version=card.version,
        parameters=[f"{key}={value}" for key, value in parameters.items()],
        manufacturer=MANUFACTURER,
    )


def _measurement_group(tracking: str, probabilities: Sequence[float], findings: StudyFindings, sources, finding=None):
    hd = optional_import("highdicom", extra="pacs")
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = _algorithm(findings)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=tracking),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=_probability_concept(name), value=float(p), unit=codes.UCUM.NoUnits)
            for name, p in zip(findings.class_names, probabilities)
        ],
        qualitative_evaluations=(
            [hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=finding)] if finding is not None else None
        ),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources] or None,
    )


def _check_findings(findings: StudyFindings, by_uid: dict[str, Any]) -> None:
    n = len(findings.class_names)
    values = [findings.probabilities, *(unit.probabilities for unit in findings.units)]
    if any(len(v) != n for v in values):
        raise ValueError(f"every probability vector must have one value per class ({n})")
    if not all(np.all(np.isfinite(np.asarray(v, dtype=float))) for v in values):
        raise ValueError("refusing to write a DICOM result with a non-finite probability")
    missing = {uid for unit in findings.units for uid in unit.source_sop_instance_uids} - by_uid.keys()
    if missing:
        raise ValueError(f"{len(missing)} referenced instance(s) are not among the source headers, e.g. {min(missing)}")


def build_result_objects(
    findings: StudyFindings,
    source: Sequence[Any],
    overlay_rgb: np.ndarray | None = None,
) -> ResultObjects:
    """The SR (and, given the key unit's CAM overlay as RGB uint8, the SC) for ``source``, the
    headers (pydicom datasets, pixels not needed) of the series the prediction was made on."""
    hd = optional_import("highdicom", extra="pacs")
    coding_schemes = optional_import("highdicom.coding_schemes", extra="pacs")
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if not source:
        raise ValueError("no source DICOM headers: a DICOM result needs the series it describes")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    _check_findings(findings, by_uid)
    source = [_with_patient_module(ds) for ds in source]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    common: dict[str, Any] = dict(
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"covidscan {findings.model.architecture}",
        software_versions=[f"covidscan {__version__}", f"model {findings.model.version}"],
        content_qualification="RESEARCH",
        coding_schemes=[
            coding_schemes.CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME, name="covidscan model outputs", responsible_organization=MANUFACTURER
            )
        ],
    )
    key_unit = findings.units[findings.key_index] if findings.units else None
    overlay = None
    if overlay_rgb is not None:
        key_sources = [by_uid[uid] for uid in key_unit.source_sop_instance_uids] if key_unit else source[:1]
        overlay = _secondary_capture(findings, key_sources, overlay_rgb, key_unit, common)

    groups = [
        _measurement_group(
            "study verdict", findings.probabilities, findings, [], class_concept(findings.predicted_label)
        )
    ]
    groups += [
        _measurement_group(unit.name, unit.probabilities, findings, [by_uid[u] for u in unit.source_sop_instance_uids])
        for unit in findings.units
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(),
            name=findings.model.model_id[:64],
            manufacturer_name=MANUFACTURER,
            model_name=findings.model.architecture,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept(value="24627-2", scheme_designator="LN", meaning="CT Chest"),
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_qualitative_evaluations(findings, overlay))
    sr = hd.sr.ComprehensiveSR(
        evidence=[*source, *([overlay] if overlay is not None else [])],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        **common,
    )
    return ResultObjects(sr, overlay)


def _qualitative_evaluations(findings: StudyFindings, overlay):
    """TID 1500's *Qualitative Evaluations*: the rule and the notice as text, the overlay by reference."""
    hd = optional_import("highdicom", extra="pacs")
    from pydicom.sr.codedict import codes

    container = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept(*UMLS_QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=_private(*AGGREGATION_CONCEPT),
                value=findings.aggregation,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=RESEARCH_USE_NOTICE,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    if overlay is not None:
        container.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=codes.DCM.BestIllustrationOfFinding,
                referenced_sop_class_uid=overlay.SOPClassUID,
                referenced_sop_instance_uid=overlay.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return container


def _with_patient_module(ds):
    """highdicom copies the patient/study module from the source; absent optional attributes
    (anonymised data often lacks PatientName) are added empty, on a copy, so that copying works."""
    missing = [
        k
        for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID")
        if k not in ds
    ]
    missing += [k for k in ("StudyDate", "StudyTime", "ReferringPhysicianName") if k not in ds]
    if not missing:
        return ds
    copy = ds.copy()
    for keyword in missing:
        setattr(copy, keyword, None)
    return copy


def _secondary_capture(findings: StudyFindings, key_sources, overlay_rgb: np.ndarray, key_unit, common):
    hd = optional_import("highdicom", extra="pacs")
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    reference = key_sources[len(key_sources) // 2]
    where = key_unit.name if key_unit else "key slice"
    label = findings.predicted_label
    banner = (
        f"covidscan {findings.model.model_id} v{findings.model.version}: {label} "
        f"p={max(findings.probabilities):.3f} ({findings.aggregation}); CAM of {where}. "
        "RESEARCH USE ONLY - NOT A DIAGNOSIS"
    )
    pixels = with_banner(np.asarray(overlay_rgb, dtype=np.uint8), banner)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        patient_orientation=patient_orientation(reference),
        series_description=SC_SERIES_DESCRIPTION,
        **common,
    )
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{banner}. {RESEARCH_USE_NOTICE}"[:10240]
    sc.DerivationDescription = f"CAM overlay computed by covidscan from {where}"[:1024]
    items = []
    for ds in key_sources:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    sc.SourceImageSequence = items
    series = Dataset()
    series.SeriesInstanceUID = reference.SeriesInstanceUID
    series.ReferencedInstanceSequence = items
    sc.ReferencedSeriesSequence = [series]
    return sc


def patient_orientation(ds) -> tuple[str, str]:
    """Row and column directions as patient-orientation letters from ImageOrientationPatient
    (the dominant axis of each; axial CT gives ("L", "P")); standard axial when the tag is absent."""
    if "ImageOrientationPatient" not in ds or len(ds.ImageOrientationPatient) != 6:
        return ("L", "P")
    vectors = np.asarray([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # +x = patient left, +y = posterior, +z = head
    result = []
    for vector in vectors:
        axis = int(np.argmax(np.abs(vector)))
        result.append(letters[axis][0] if vector[axis] > 0 else letters[axis][1])
    return result[0], result[1]


def with_banner(rgb: np.ndarray, text: str) -> np.ndarray:
    """``rgb`` with a black band above it carrying ``text`` (wrapped), burned into the pixels."""
    image = Image.fromarray(rgb).convert("RGB")
    font_size = max(12, image.width // 45)
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(image)
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) > image.width - 16 and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    height = int(font_size * 1.3) * len(lines) + 12
    canvas = Image.new("RGB", (image.width, image.height + height), "black")
    canvas.paste(image, (0, height))
    draw = ImageDraw.Draw(canvas)
    for row, text_line in enumerate(lines):
        draw.text((8, 6 + row * int(font_size * 1.3)), text_line, fill=(255, 200, 0), font=font)
    return np.asarray(canvas)


def png_to_rgb(png: bytes) -> np.ndarray:
    """An overlay PNG (as rendered by :mod:`covidscan.explain`) as an RGB uint8 array."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def read_study_report(sr) -> dict[str, Any]:
    """The covidscan content of a Structured Report dataset: study probabilities, finding,
    algorithm (model id, version, parameters), per-unit probabilities, aggregation rule and notices."""
    root = sr.ContentSequence
    result: dict[str, Any] = {"units": {}, "texts": {}, "study_instance_uid": str(sr.StudyInstanceUID)}
    for item in root:
        name = item.ConceptNameCodeSequence[0]
        if name.CodeMeaning == "Imaging Measurements":
            for group in item.ContentSequence:
                parsed = _parse_group(group)
                if parsed["tracking"] == "study verdict":
                    result.update(
                        probabilities=parsed["probabilities"],
                        finding=parsed.get("finding"),
                        algorithm=parsed["algorithm"],
                    )
                else:
                    result["units"][parsed["tracking"]] = parsed["probabilities"]
        elif name.CodeValue == UMLS_QUALITATIVE_EVALUATIONS[0]:
            for child in item.ContentSequence:
                if child.ValueType == "TEXT":
                    result["texts"][child.ConceptNameCodeSequence[0].CodeMeaning] = str(child.TextValue)
    return result


def _parse_group(group) -> dict[str, Any]:
    parsed: dict[str, Any] = {"probabilities": {}, "algorithm": {"parameters": {}}}
    for item in group.ContentSequence:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM" and meaning.startswith("Probability of "):
            parsed["probabilities"][meaning.removeprefix("Probability of ")] = float(
                item.MeasuredValueSequence[0].NumericValue
            )
        elif item.ValueType == "TEXT" and meaning == "Tracking Identifier":
            parsed["tracking"] = str(item.TextValue)
        elif item.ValueType == "CODE" and meaning == "Finding":
            parsed["finding"] = str(item.ConceptCodeSequence[0].CodeMeaning)
        elif item.ValueType == "TEXT" and meaning == "Algorithm Name":
            parsed["algorithm"]["name"] = str(item.TextValue)
        elif item.ValueType == "TEXT" and meaning == "Algorithm Version":
            parsed["algorithm"]["version"] = str(item.TextValue)
        elif item.ValueType == "TEXT" and meaning == "Algorithm Parameters":
            key, _, value = str(item.TextValue).partition("=")
            parsed["algorithm"]["parameters"][key] = value
    return parsed
