"""A study in, results back: DICOMweb (QIDO-RS / WADO-RS / STOW-RS) through ``dicomweb-client``.

``fetch_study_series`` picks the study's axial CT series from its metadata (QIDO + series metadata,
no pixels) by the same rule as for files (:func:`covidscan.data.choose_series`), and streams its
instances to a folder one at a time, so memory stays at one instance however long the series;
``store_results`` sends the DICOM result objects back (STOW-RS). Storing is never implicit: the
caller decides (``covidscan predict --dicomweb ... --store-results``).

Authentication: a bearer token from ``COVIDSCAN_DICOMWEB_TOKEN``, or user and password in the URL
(``https://user:password@pacs/dicom-web``), sent as HTTP basic auth.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from covidscan.data import DataError
from covidscan.data import choose_series as choose_by_tags
from covidscan.data.readers.dicom import series_plane
from covidscan.errors import UsageError
from covidscan.optional import optional_import

log = logging.getLogger(__name__)
TOKEN_VARIABLE = "COVIDSCAN_DICOMWEB_TOKEN"
# Tags (hex) read from QIDO-RS series results and WADO-RS metadata
MODALITY, SERIES_UID, SERIES_DESCRIPTION, SOP_INSTANCE_UID = "00080060", "0020000E", "0008103E", "00080018"
ORIENTATION, RELATED_INSTANCES = "00200037", "00201209"
IMAGE_TYPE, SERIES_NUMBER = "00080008", "00200011"
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "DOC"})  # reports and states: no slices to choose


class DicomWebError(DataError):
    """The DICOMweb server refused or could not be reached; the message names the URL and the fix."""


@dataclass(frozen=True)
class ChosenSeries:
    """The series a study prediction reads, and why it was chosen among the study's series."""

    series_instance_uid: str
    description: str
    instances: int
    reason: str


def connect(url: str, timeout: float = 60.0):
    """A ``DICOMwebClient`` for ``url``; credentials come from the URL or ``COVIDSCAN_DICOMWEB_TOKEN``."""
    requests = optional_import("requests", extra="pacs")
    dicomweb_client = optional_import("dicomweb_client.api", extra="pacs")

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DicomWebError(f"{url}: not a DICOMweb URL; give the service root, e.g. http://pacs:8042/dicom-web")
    session = requests.Session()
    if parts.username:
        session.auth = (parts.username, parts.password or "")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    headers = {"Authorization": f"Bearer {os.environ[TOKEN_VARIABLE]}"} if os.environ.get(TOKEN_VARIABLE) else None
    session.request = _with_timeout(session.request, timeout)
    client = dicomweb_client.DICOMwebClient(url=url.rstrip("/"), session=session, headers=headers)
    # a busy server (429/503) is retried briefly; an unreachable one fails in seconds, not half a minute
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
    return client


def _with_timeout(request, timeout: float):
    def bounded(*args, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return request(*args, **kwargs)

    return bounded


def _value(item: dict[str, Any], tag: str, default: Any = None) -> Any:
    values = item.get(tag, {}).get("Value")
    return values if tag == ORIENTATION else (values[0] if values else default)


@dataclass(frozen=True)
class RemoteSeries:
    """One series of a study on the server, described by its metadata, for :func:`covidscan.data.choose_series`."""

    series_uid: str
    modality: str | None
    plane: str
    image_type: tuple[str, ...]
    description: str
    series_number: int | None
    num_slices: int


def _remote_series(client, study_uid: str, item: dict[str, Any]) -> RemoteSeries:
    """A series from its QIDO-RS entry; a CT series' instance metadata too (orientation, ImageType)."""
    uid, modality = _value(item, SERIES_UID), _value(item, MODALITY)
    number = _value(item, SERIES_NUMBER)
    plane = "unknown"
    image_type: tuple[str, ...] = ()
    count = 0 if modality in NON_IMAGE_MODALITIES else int(_value(item, RELATED_INSTANCES, 0) or 0)
    if modality == "CT":
        metadata = client.retrieve_series_metadata(study_uid, uid)
        orientations = {
            tuple(round(float(v), 3) for v in values)
            for m in metadata
            if (values := _value(m, ORIENTATION)) and len(values) == 6
        }
        plane, count = series_plane(orientations), len(metadata)
        image_type = tuple(str(v) for v in (metadata[0].get(IMAGE_TYPE, {}).get("Value") or ())) if metadata else ()
    return RemoteSeries(
        uid,
        modality,
        plane,
        image_type,
        _value(item, SERIES_DESCRIPTION, ""),
        None if number is None else int(number),
        count,
    )


def choose_series(client, study_uid: str, series_uid: str | None = None) -> ChosenSeries:
    """The study's axial CT series by :func:`covidscan.data.choose_series`'s rule (or ``series_uid`` when given)."""
    try:
        series = client.search_for_series(study_uid)
    except Exception as exc:  # requests / dicomweb-client raise HTTPError, ConnectionError, ...
        raise _error(client, f"cannot list the series of study {study_uid}", exc) from None
    if not series:
        raise DicomWebError(f"{client.base_url}: study {study_uid} not found (no series); check the Study Instance UID")
    if series_uid is not None:
        match = [s for s in series if _value(s, SERIES_UID) == series_uid]
        if not match:
            raise DicomWebError(f"{client.base_url}: series {series_uid} is not in study {study_uid}")
        return ChosenSeries(series_uid, _value(match[0], SERIES_DESCRIPTION, ""), 0, "requested with --series")
    try:
        remote = [_remote_series(client, study_uid, item) for item in series]
    except Exception as exc:
        raise _error(client, f"cannot read the series metadata of study {study_uid}", exc) from None
    try:
        chosen, reason = choose_by_tags(remote)
    except DataError as exc:
        raise DicomWebError(
            f"{client.base_url}: study {study_uid}: {exc}; name a series with --series if it is axial CT without "
            "orientation tags"
        ) from None
    return ChosenSeries(chosen.series_uid, chosen.description, chosen.num_slices, reason)


def fetch_series(client, study_uid: str, series_uid: str, folder: str | Path) -> list[Path]:
    """Stream the series' instances into ``folder`` (``<SOPInstanceUID>.dcm``), one at a time,
    in the transfer syntax the server stores (no server-side transcoding)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    try:
        for dataset in client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),)):
            path = folder / f"{dataset.SOPInstanceUID}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            files.append(path)
    except DataError:
        raise
    except Exception as exc:  # network and multipart parsing errors
        raise _error(client, f"cannot retrieve series {series_uid}", exc) from None
    if not files:
        raise DicomWebError(f"{client.base_url}: series {series_uid} of study {study_uid} has no instances")
    return files


def store_results(client, datasets: Sequence[Any]) -> list[str]:
    """STOW-RS the result objects; returns their SOP Instance UIDs as the server acknowledged them."""
    if not datasets:
        return []
    study_uids = {str(ds.StudyInstanceUID) for ds in datasets}
    if len(study_uids) != 1:
        raise UsageError(f"result objects span {len(study_uids)} studies; store each study's results separately")
    try:
        response = client.store_instances(list(datasets), study_instance_uid=study_uids.pop())
    except Exception as exc:
        raise _error(client, "cannot store the result objects (STOW-RS)", exc) from None
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        raise DicomWebError(f"{client.base_url}: the server refused {len(failed)} of {len(datasets)} result objects")
    stored = response.get("ReferencedSOPSequence", []) if response is not None else []
    return [str(item.ReferencedSOPInstanceUID) for item in stored]


def _error(client, what: str, exc: Exception) -> DicomWebError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    hint = {
        401: "the server wants credentials: put them in the URL or set " + TOKEN_VARIABLE,
        403: "the credentials are not allowed to do this",
        404: "check the URL (the DICOMweb root, e.g. http://host:8042/dicom-web) and the UIDs",
    }.get(status or 0, "check that the server is running and the URL is its DICOMweb root")
    detail = f"HTTP {status}" if status else f"{type(exc).__name__}: {str(exc)[:200]}"
    return DicomWebError(f"{client.base_url}: {what} ({detail}); {hint}")
