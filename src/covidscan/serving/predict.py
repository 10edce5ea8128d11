"""Batch prediction to a CSV (study A's submission file, or one row per CT study): streamed, resumable,
never aborted by one file.

Rows are appended and flushed batch by batch, so an interrupted run keeps everything finished; run
the same command again and files already in the CSV are skipped (a half-written last line is cut
off first). Files are matched by their normalised absolute path, so ``imgs/a.png`` and
``/data/imgs/a.png`` are one file. A file that cannot be read, or whose model output is not
finite, gets a row with its ``error`` and empty probabilities. ``<out>.json`` beside the CSV records
the model (id, version, checkpoint hash), the engine and the test-time augmentation; resuming with
another model or TTA is refused. ``predict_studies`` does the same with one row per study (and
optionally one per slice or stack) through :func:`covidscan.inference.predict_study`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from covidscan.data import DataError, find_studies, list_inputs
from covidscan.errors import UsageError
from covidscan.inference import RESEARCH_USE_NOTICE, Predictor
from covidscan.inference.studies import Aggregation, aggregate, predict_study
from covidscan.progress import progress as show_progress
from covidscan.runtime import atomic_path, write_json

PATH_COLUMN, LABEL_COLUMN, ERROR_COLUMN = "path", "predicted_label", "error"
SIDECAR_FORMAT = "covidscan-predictions/1"


def csv_header(class_names: Sequence[str]) -> list[str]:
    return [PATH_COLUMN, LABEL_COLUMN, *(f"prob_{name}" for name in class_names), ERROR_COLUMN]


@dataclass(frozen=True)
class PredictSummary:
    out: Path
    predicted: int  # rows written with probabilities in this call
    failed: int  # rows written with an error in this call
    skipped: int  # already in the CSV from an earlier run


def path_key(path: str | Path) -> str:
    """One spelling per file: absolute, normalised, symlinks resolved (what resuming matches on)."""
    return os.path.realpath(os.path.abspath(path))


class _PredictionInputs(Dataset):
    """Reads and preprocesses one file per item; errors become data, so one bad file cannot stop a batch."""

    def __init__(self, paths: Sequence[Path], predictor: Predictor) -> None:
        self.paths = list(paths)
        self.predictor = predictor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], str]:
        try:
            return index, self.predictor.read(self.paths[index]), ""
        except DataError as exc:
            return index, self.predictor.empty_input(), str(exc)


def finished_paths(out: Path, header: list[str]) -> set[str]:
    """Keys (:func:`path_key`) of the files already in ``out``; a partial last line is truncated away."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    with open(out, "rb+") as handle:
        content = handle.read()
        if not content.endswith(b"\n"):  # killed mid-row: drop the fragment, redo that file
            handle.truncate(content.rfind(b"\n") + 1)
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return set()
    if rows[0] != header:
        raise UsageError(
            f"{out}: exists with columns {rows[0]}, not {header} (another model?); "
            "choose another --out or delete the file"
        )
    return {path_key(row[0]) for row in rows[1:] if row}


def sidecar_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def check_sidecar(out: Path, description: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``<out>.json`` (model provenance, TTA, notice) or, when resuming, refuse another model/TTA."""
    sidecar = sidecar_path(out)
    if sidecar.is_file() and out.is_file():
        try:
            recorded = json.loads(sidecar.read_text()).get("model", {})
        except (OSError, json.JSONDecodeError):
            recorded = {}
        for key in ("model_version", "tta"):
            if key in recorded and recorded[key] != description[key]:
                raise UsageError(
                    f"{out}: was written with {key} {recorded[key]!r}, this run uses {description[key]!r}; "
                    "choose another --out (or delete the file) rather than mix two models' rows"
                )
        return
    write_json(
        sidecar, {"format": SIDECAR_FORMAT, "model": description, "notice": RESEARCH_USE_NOTICE, **(extra or {})}
    )


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> PredictSummary:
    """Predict every supported 2D file under ``inputs`` (files or folders) into the CSV ``out``."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    if predictor.spatial_dims != 2:
        raise UsageError(
            f"{predictor.source}: a 3D model predicts whole scans: use predict_studies (covidscan predict --studies)"
        )
    out = Path(out)
    class_names = predictor.class_names
    header = csv_header(class_names)
    done = finished_paths(out, header)
    todo: list[Path] = []
    seen = set(done)
    for path in list_inputs(list(inputs)):
        key = path_key(path)
        if key not in seen:
            seen.add(key)
            todo.append(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_sidecar(out, predictor.describe())
    loader = DataLoader(_PredictionInputs(todo, predictor), batch_size=batch_size, num_workers=num_workers)
    predicted = failed = 0
    with (
        open(out, "a", newline="", encoding="utf-8") as handle,
        show_progress(total=len(todo), desc="predict", unit="img", leave=True, disable=not progress) as bar,
    ):
        writer = csv.writer(handle)
        if handle.tell() == 0:
            writer.writerow(header)
        for indices, views, errors in loader:
            errors = list(errors)
            ok = [i for i, error in enumerate(errors) if not error]
            probabilities, model_errors = predictor.predict_items([view[ok] for view in views])
            by_row = dict(zip(ok, zip(probabilities, model_errors)))
            for row, index in enumerate(indices.tolist()):
                name = str(todo[index])
                error = errors[row] or by_row[row][1]
                if error:
                    writer.writerow([name, "", *[""] * len(class_names), error])
                    failed += 1
                else:
                    p = by_row[row][0]
                    writer.writerow([name, class_names[int(np.argmax(p))], *(f"{v:.6f}" for v in p), ""])
                    predicted += 1
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(errors))
    return PredictSummary(out, predicted, failed, len(done))


STUDY_COLUMNS = ("study", "study_instance_uid", "series_instance_uid", "unit", "n_items", "aggregation")
ITEM_COLUMNS = ("study", "study_instance_uid", "index", "last_index", "z_mm")


def study_header(class_names: Sequence[str]) -> list[str]:
    return [
        *STUDY_COLUMNS,
        LABEL_COLUMN,
        *(f"prob_{n}" for n in class_names),
        "model_version",
        "warnings",
        ERROR_COLUMN,
    ]


def item_header(class_names: Sequence[str]) -> list[str]:
    return [*ITEM_COLUMNS, *(f"prob_{n}" for n in class_names), ERROR_COLUMN]


def _study_key(path: str, uid: str) -> tuple[str, str]:
    return path_key(path), uid


def _finished_studies(out: Path, header: list[str]) -> set[tuple[str, str]]:
    """(path key, StudyInstanceUID) of the studies already in ``out``; a partial last line is cut off."""
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    finished_paths(out, header)  # truncates a partial line and checks the header
    with open(out, newline="", encoding="utf-8") as handle:
        return {_study_key(row["study"], row["study_instance_uid"]) for row in csv.DictReader(handle)}


def _keep_finished_items(path: Path, header: list[str], done: set[tuple[str, str]]) -> None:
    """Drop per-slice rows of studies not in the study CSV (an interrupted study is redone whole)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    finished_paths(path, header)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    kept = [row for row in rows if _study_key(row[0], row[1]) in done]
    if len(kept) != len(rows):
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *kept])


@dataclass(frozen=True)
class StudySummary:
    out: Path
    per_slice: Path | None
    predicted: int  # study rows written with a verdict in this call
    failed: int  # study rows written with an error in this call
    skipped: int  # already in the CSV from an earlier run


def predict_studies(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    per_slice: str | Path | None = None,
    every: int = 1,
    aggregation: Aggregation = "mean",
    top_k: int = 5,
    batch_size: int = 16,
    include_identifiers: bool = False,
    progress: bool = True,
) -> StudySummary:
    """One row per study found under ``inputs`` (see :func:`covidscan.data.find_studies`) in
    the CSV ``out``, plus one row per slice/stack in ``per_slice`` when given. Resumable like
    :func:`predict_files`: finished studies are skipped, an interrupted one is redone (its partial
    per-slice rows removed first); a study that cannot be read gets an error row."""

    aggregate(np.full((1, 2), 0.5), aggregation, top_k)  # a bad rule fails before any file is read
    out = Path(out)
    names = predictor.class_names
    header, items_header = study_header(names), item_header(names)
    done = _finished_studies(out, header)
    slices_path = Path(per_slice) if per_slice is not None else None
    if slices_path is not None:
        _keep_finished_items(slices_path, items_header, done)
    studies = [
        s
        for s in find_studies(inputs, predictor.config.data.limits)
        if _study_key(str(s.path), s.study_uid or "") not in done
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"studies": {"every": every, "aggregation": aggregation, "top_k": top_k}}
    check_sidecar(out, predictor.describe(), settings)
    predicted = failed = 0
    with ExitStack() as stack:
        handle = stack.enter_context(open(out, "a", newline="", encoding="utf-8"))
        writer = csv.writer(handle)
        if handle.tell() == 0:
            writer.writerow(header)
        item_handle = item_writer = None
        if slices_path is not None:
            slices_path.parent.mkdir(parents=True, exist_ok=True)
            item_handle = stack.enter_context(open(slices_path, "a", newline="", encoding="utf-8"))
            item_writer = csv.writer(item_handle)
            if item_handle.tell() == 0:
                item_writer.writerow(items_header)
        bar = stack.enter_context(
            show_progress(total=len(studies), desc="predict", unit="study", leave=True, disable=not progress)
        )
        for source in studies:
            path, uid = str(source.path), source.study_uid or ""
            try:
                result = predict_study(
                    predictor,
                    source,
                    every=every,
                    aggregation=aggregation,
                    top_k=top_k,
                    batch_size=batch_size,
                    include_identifiers=include_identifiers,
                )
            except DataError as exc:
                writer.writerow([path, uid, "", "", "", "", "", *[""] * len(names), predictor.card.version, "", exc])
                failed += 1
            else:
                if item_writer is not None and item_handle is not None:
                    item_writer.writerows(
                        [path, uid, item.index, item.last_index, "" if item.z_mm is None else item.z_mm]
                        + ([f"{p:.6f}" for p in item.probabilities] if item.probabilities else [""] * len(names))
                        + [item.error]
                        for item in result.items
                    )
                    item_handle.flush()
                    os.fsync(item_handle.fileno())
                writer.writerow(
                    [
                        path,
                        uid,
                        result.series["series_instance_uid"] or "",
                        result.unit,
                        len(result.items),
                        result.aggregation,
                        result.predicted_label,
                        *(f"{result.probabilities[n]:.6f}" for n in names),
                        predictor.card.version,
                        " | ".join(result.warnings),
                        "",
                    ]
                )
                predicted += 1
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(1)
    return StudySummary(out, slices_path, predicted, failed, len(done))
