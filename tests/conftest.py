"""Shared fixtures: synthetic data made in the tests, and the real datasets beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def write_image_folder(root: Path, classes: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """A folder-per-class tree of random grayscale PNGs; class c gets brightness offset c."""
    rng = np.random.default_rng(seed)
    for offset, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(rng.normal(60 + 100 * offset, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name} ({i}).png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", {"COVID": 12, "normal": 12})
