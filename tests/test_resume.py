"""Resume safety: a resume that may not continue the run is refused before anything in it changes."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from covidscan.cli import main
from covidscan.config import ConfigError, config_from_dict
from covidscan.training import Callback, train
from covidscan.training.resume import check_resumable
from helpers import write_image_folder


def _config(source: Path, output_dir: Path, overrides: list[str] = ()):  # type: ignore[assignment]
    raw = {
        "name": "resume",
        "output_dir": str(output_dir),
        "data": {
            "source": str(source),
            "image_size": 32,
            "channels": 1,
            "normalize": "sample",
            "split": {"method": "stratified", "ratios": [0.75, 0.25, 0.0]},
        },
        "model": {"name": "cnn1"},
        "training": {"batch_size": 8, "phases": [{"epochs": 2, "lr": 0.001}]},
    }
    return config_from_dict(raw, list(overrides))


def _digest(run_dir: Path) -> dict[str, str]:
    """Every file of the run and its content hash."""
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


class InterruptAfterFirstEpoch(Callback):
    def on_epoch_end(self, loop, metrics):
        if loop.epoch == 1:
            raise KeyboardInterrupt


def test_a_refused_resume_leaves_the_run_byte_for_byte_and_resumable(image_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_config(image_folder, tmp_path / "runs"), run_dir=run_dir, callbacks=[InterruptAfterFirstEpoch()])
    before = _digest(run_dir)
    other = write_image_folder(tmp_path / "other", {"COVID": 6, "normal": 6}, seed=1)

    for change in ("model.name=cnn3", f"data.source={other}", "training.phases.0.lr=0.1"):
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir), "--set", change]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and change.split("=")[0] in error, error
        assert _digest(run_dir) == before, change

    assert main(["train", "--resume", str(run_dir)]) == 0  # the plain resume still works
    with (run_dir / "history.csv").open() as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2]


def test_a_missing_or_foreign_run_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "not-a-run"
    run_dir.mkdir()
    assert main(["train", "--resume", str(run_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(run_dir) in error
    assert list(run_dir.iterdir()) == []
    (run_dir / "config.yaml").write_text("name: foreign\n")  # a config but no checkpoint
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "last.pt" in capsys.readouterr().err
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"]


def test_what_a_resume_may_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = write_image_folder(tmp_path / "images", {"COVID": 2, "normal": 2})
    saved = _config(source, tmp_path / "runs", ["training.phases=[{epochs: 2, lr: 0.001}, {epochs: 3, lr: 0.0001}]"])
    allowed = [
        "training.phases.0.epochs=5",  # extend the phase it stopped in
        "training.phases.1.lr=0.01",  # a phase not started yet
        "training.device=cpu",
        "data.num_workers=2",
        "output_dir=elsewhere",
        "model.pretrained=true",  # the weights come from last.pt anyway
    ]
    for change in allowed:
        check_resumable(saved, _config(source, tmp_path / "runs", [saved_phases(saved), change]), phase=0)
    check_resumable(saved, _config(Path("images"), tmp_path / "runs", [saved_phases(saved)]), phase=0)  # same folder

    for change in ("training.phases.0.lr=0.01", "training.batch_size=4", "model.kwargs={dropout: 0.1}", "seed=1"):
        with pytest.raises(ConfigError, match=change.split("=")[0].replace(".", r"\.")):
            check_resumable(saved, _config(source, tmp_path / "runs", [saved_phases(saved), change]), phase=0)
    # once phase 1 has started it is fixed too
    with pytest.raises(ConfigError, match=r"training\.phases\.1\.lr"):
        check_resumable(
            saved, _config(source, tmp_path / "runs", [saved_phases(saved), "training.phases.1.lr=0.01"]), 1
        )


def saved_phases(config) -> str:
    phases = ", ".join(f"{{epochs: {p.epochs}, lr: {p.lr}}}" for p in config.training.phases)
    return f"training.phases=[{phases}]"
