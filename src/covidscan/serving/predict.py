"""Batch prediction to a CSV (study A's submission file): streamed, resumable, never aborted by one file.

Rows are appended and flushed batch by batch, so an interrupted run keeps everything finished; run
the same command again and files already in the CSV are skipped (a half-written last line is cut
off first). A file that cannot be read gets a row with its ``error`` and empty probabilities.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from covidscan.data import DataError, list_inputs, read_image
from covidscan.errors import UsageError
from covidscan.progress import progress as show_progress
from covidscan.serving.engine import Predictor, preprocessing

PATH_COLUMN, LABEL_COLUMN, ERROR_COLUMN = "path", "predicted_label", "error"


def csv_header(class_names: Sequence[str]) -> list[str]:
    return [PATH_COLUMN, LABEL_COLUMN, *(f"prob_{name}" for name in class_names), ERROR_COLUMN]


@dataclass(frozen=True)
class PredictSummary:
    out: Path
    predicted: int  # rows written with probabilities in this call
    failed: int  # rows written with an error in this call
    skipped: int  # already in the CSV from an earlier run


class _PredictionInputs(Dataset):
    """Reads and preprocesses one file per item; errors become data, so one bad file cannot stop a batch."""

    def __init__(self, paths: Sequence[Path], predictor: Predictor) -> None:
        self.paths = list(paths)
        self.transform = preprocessing(predictor)
        self.window = predictor.config.data.window
        data = predictor.config.data
        self.empty = torch.zeros(data.channels, data.image_size, data.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            return index, self.transform(read_image(self.paths[index], self.window)), ""
        except DataError as exc:
            return index, self.empty, str(exc)


def finished_paths(out: Path, header: list[str]) -> set[str]:
    """Paths already in ``out`` from an interrupted run; a partial last line is truncated away."""
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
    return {row[0] for row in rows[1:] if row}


def predict_files(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> PredictSummary:
    """Predict every supported file under ``inputs`` (files or folders) into the CSV ``out``."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    out = Path(out)
    class_names = predictor.card.class_names
    header = csv_header(class_names)
    done = finished_paths(out, header)
    todo = [path for path in list_inputs(list(inputs)) if str(path) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(_PredictionInputs(todo, predictor), batch_size=batch_size, num_workers=num_workers)
    predicted = failed = 0
    with (
        open(out, "a", newline="", encoding="utf-8") as handle,
        show_progress(total=len(todo), desc="predict", unit="img", leave=True, disable=not progress) as bar,
    ):
        writer = csv.writer(handle)
        if handle.tell() == 0:
            writer.writerow(header)
        for indices, batch, errors in loader:
            ok = [i for i, error in enumerate(errors) if not error]
            probabilities = predictor.predict_batch(batch[ok]) if ok else np.empty((0, len(class_names)))
            by_row = dict(zip(ok, probabilities))
            for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
                path = str(todo[index])
                if error:
                    writer.writerow([path, "", *[""] * len(class_names), error])
                else:
                    p = by_row[row]
                    writer.writerow([path, class_names[int(np.argmax(p))], *(f"{v:.6f}" for v in p), ""])
            handle.flush()
            os.fsync(handle.fileno())
            predicted += len(ok)
            failed += len(errors) - len(ok)
            bar.update(len(errors))
    return PredictSummary(out, predicted, failed, len(done))
