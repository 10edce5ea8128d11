"""The CLI tells a user's mistake (one line, exit 2) from a bug in covidscan (exit 1, traceback with -v),
and every optional extra that is missing names the pip command that installs it."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import covidscan
from covidscan.cli import main
from covidscan.config import ConfigError
from covidscan.data import DataError
from covidscan.errors import UsageError, UserError
from covidscan.optional import MissingExtraError, optional_import

ROOT = Path(__file__).resolve().parents[1]


def test_documented_user_errors_share_one_base_and_stay_value_errors():
    for error in (ConfigError, DataError, UsageError):
        assert issubclass(error, UserError) and issubclass(error, ValueError)
    assert issubclass(MissingExtraError, UserError) and issubclass(MissingExtraError, ImportError)


def test_user_error_is_one_line_with_exit_2(tmp_path, capsys):
    assert main(["runs", "list", str(tmp_path), "--sort", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"covidscan runs: error: --sort 'nonsense' is not a column; choose from {_columns()}"


def _columns() -> list[str]:
    from covidscan.tracking.runs import RunSummary

    return list(RunSummary.__dataclass_fields__)


def test_missing_input_file_is_a_user_error(tmp_path, capsys):
    assert main(["runs", "list", str(tmp_path / "missing")]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture
def buggy_list_runs(monkeypatch):
    """``runs list`` hitting an internal ValueError, the kind that used to pass for a user error."""

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr("covidscan.tracking.runs.list_runs", broken)


def test_bug_without_verbose_is_a_short_report_request(buggy_list_runs, tmp_path, capsys):
    assert main(["runs", "list", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "internal error: ValueError: operands could not be broadcast together" in err
    assert "this is a bug in covidscan: rerun with -v and report it" in err


def test_bug_with_verbose_shows_the_traceback(buggy_list_runs, tmp_path, capsys):
    assert main(["-v", "runs", "list", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "in broken" in err  # the frame that raised
    assert "please report it with the traceback above" in err


# --- optional extras ------------------------------------------------------------------------------------


def test_optional_import_returns_the_module():
    assert optional_import("covidscan.optional", extra="serve").optional_import is optional_import


def _block(monkeypatch, *modules: str) -> None:
    """Make ``modules`` unimportable, as when the extra is not installed (None in sys.modules)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _expect_extra(extra: str):
    return pytest.raises(MissingExtraError, match=re.escape(f'pip install "covidscan[{extra}]"'))


def test_missing_serve_extra(monkeypatch, tmp_path, capsys):
    _block(monkeypatch, "uvicorn")
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "covidscan[serve]"' in err and "Traceback" not in err

    _block(monkeypatch, "fastapi")
    from covidscan.serving import create_app

    with _expect_extra("serve"):
        create_app(tmp_path)


def test_missing_export_extra(monkeypatch, tmp_path):
    from covidscan.inference import OnnxEngine
    from covidscan.serving import export_model

    _block(monkeypatch, "onnxscript")
    with _expect_extra("export"):
        export_model(tmp_path / "run", "onnx")
    _block(monkeypatch, "onnxruntime")
    with _expect_extra("export"):
        OnnxEngine(tmp_path / "model.onnx")


def test_missing_track_extra(monkeypatch, tmp_path):
    from covidscan.config import RunConfig
    from covidscan.tracking import TensorBoardCallback, parse_search_space
    from covidscan.tracking.mlflow import MLflowCallback

    loop = SimpleNamespace(run_dir=tmp_path, config=RunConfig())  # what on_fit_start reads of the loop
    _block(monkeypatch, "optuna", "optuna.distributions")
    with _expect_extra("track"):
        parse_search_space({"training.batch_size": {"type": "categorical", "choices": [8, 16]}})
    _block(monkeypatch, "mlflow", "mlflow.entities")
    with _expect_extra("track"):
        MLflowCallback(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").on_fit_start(loop)
    _block(monkeypatch, "torch.utils.tensorboard")
    with _expect_extra("track"):
        TensorBoardCallback().on_fit_start(loop)


def test_every_optional_import_names_an_extra_of_the_package():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    calls = [
        match
        for path in Path(covidscan.__file__).parent.rglob("*.py")
        for match in re.findall(r"optional_import\(\s*(\S+),\s*extra=\"(\w+)\"", path.read_text())
    ]
    assert len(calls) >= 10  # fastapi, uvicorn, onnx, onnxruntime, optuna, mlflow, tensorboard, highdicom, ...
    for module, extra in calls:
        assert extra in extras, f"optional_import({module}, extra={extra!r}): no such extra in pyproject.toml"


def test_missing_pacs_extra(monkeypatch):
    from covidscan.serving.dicom_results import class_concept
    from covidscan.serving.dicomweb import connect

    _block(monkeypatch, "highdicom")
    with _expect_extra("pacs"):
        class_concept("COVID")
    _block(monkeypatch, "dicomweb_client", "dicomweb_client.api")
    with _expect_extra("pacs"):
        connect("http://127.0.0.1:8042/dicom-web")


def test_a_library_log_message_shows_once_per_kind():
    """Hundreds of "Invalid value for VR UI: '<uid>'" lines (one per file of a de-identified series)
    become one, with its example; another kind of message still shows."""
    import logging

    from covidscan.notices import OncePerKindFilter

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("covidscan-test-once-per-kind")
    logger.propagate = False
    logger.addHandler(handler)
    logger.addFilter(OncePerKindFilter())
    for uid in ("1bc8b288-610b", "896911bf-1143", "7afb0d48-ec01"):
        logger.warning("Invalid value for VR UI: '%s'. Please see the standard", uid)
    logger.warning("Invalid value for VR DS: '1,5'")
    assert records == [
        "Invalid value for VR UI: '1bc8b288-610b'. Please see the standard",
        "Invalid value for VR DS: '1,5'",
    ]


def test_cli_prints_a_dicom_header_complaint_once_not_once_per_file(tmp_path):
    import subprocess

    import numpy as np
    from pydicom import config as pydicom_config

    from covidscan.data.synthetic import write_dicom_series

    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE  # write a UUID as a UID, as exporters do
    try:
        for label, patient in (("COVID", "p1"), ("Normal", "p2")):
            write_dicom_series(tmp_path / label / patient, np.zeros((3, 8, 8)), series_uid=f"{patient}-1bc8b288-610b")
    finally:
        pydicom_config.settings.writing_validation_mode = previous
    done = subprocess.run(
        [sys.executable, "-m", "covidscan", "data", "info", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    complaints = [line for line in done.stderr.splitlines() if "Invalid value for VR UI" in line]
    assert len(complaints) == 1, done.stderr  # 6 files with invalid UIDs, each read at least once
