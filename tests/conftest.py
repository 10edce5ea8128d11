"""Shared fixtures: synthetic data made in the tests, and the real datasets beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import write_image_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets``; tests using it are skipped cleanly when it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is not present")
    return SHARED_DATASETS


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the generated demo sample out of the user's home directory."""
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path_factory.getbasetemp() / "covidscan-cache"))


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    """Warn-once checks start fresh in every test: whether a test sees a warning must not depend on which
    test happened to trigger it first."""
    from covidscan.notices import reset_warnings

    reset_warnings()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", {"COVID": 12, "normal": 12})
