"""Safe checkpoints: loading never unpickles code; old full-pickle files get a conversion command."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.checkpoint import ModelFileError, load_checkpoint, save_checkpoint
from covidscan.cli import main
from covidscan.config import config_from_dict
from covidscan.evaluation import evaluate_run
from covidscan.inference import load_predictor
from covidscan.models import create_model
from helpers import CLASSES, make_checkpoint, write_image_folder


class CreatesMarker:
    """Unpickling this calls os.mkdir(marker): what a crafted checkpoint would do with a worse command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def malicious_run(tmp_path) -> tuple[Path, Path]:
    run = make_checkpoint(tmp_path)
    checkpoint = run / "checkpoints" / "best.pt"
    payload = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "code-was-executed"
    payload["metrics"] = {"val_accuracy": CreatesMarker(marker)}
    torch.save(payload, checkpoint)
    return run, marker


def test_malicious_pickle_does_not_run_in_evaluate_serve_or_predict(malicious_run, tmp_path, capsys):
    run, marker = malicious_run
    images = write_image_folder(tmp_path / "images", {"COVID": 2, "normal": 2})
    with pytest.raises(ModelFileError, match="covidscan convert"):
        evaluate_run(run, data=images, n_bootstrap=0)
    with pytest.raises(ModelFileError, match="full pickle"):
        load_predictor(run)
    assert main(["predict", "--checkpoint", str(run), "--input", str(images), "--out", str(tmp_path / "p.csv")]) == 2
    assert "refused" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(images)]) == 2
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from covidscan.serving import create_app

    with pytest.raises(ModelFileError), TestClient(create_app(run)):
        pass
    assert not marker.exists()


def old_style_checkpoint(path: Path) -> None:
    """What covidscan wrote before safe loading: a NumPy RNG state pickled as NumPy objects."""
    config = config_from_dict({"data": {"image_size": 32, "channels": 1}})
    torch.save(
        {
            "format": 1,
            "config": config.to_dict(),
            "class_names": CLASSES,
            "norm_stats": None,
            "epoch": 3,
            "metrics": {"val_loss": np.float64(0.5)},
            "state_dict": create_model("cnn1", 2, in_channels=1).state_dict(),
            "training_state": {"rng": {"numpy": np.random.get_state(), "python": random.getstate()}},
        },
        path,
    )


def test_old_checkpoint_is_refused_with_the_conversion_command_which_works(tmp_path, capsys):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    old_style_checkpoint(path)
    expected = torch.load(path, weights_only=False)["training_state"]["rng"]["numpy"]
    with pytest.raises(ModelFileError, match=f"covidscan convert {path}"):
        load_checkpoint(path)
    assert main(["convert", str(path)]) == 0
    assert "converted" in capsys.readouterr().out
    assert path.with_name("last.pt.pickle-backup").is_file()
    state = load_checkpoint(path)["training_state"]["rng"]["numpy"]
    assert state[0] == expected[0] and state[1].dtype == expected[1].dtype
    np.testing.assert_array_equal(state[1], expected[1])
    assert load_checkpoint(path)["metrics"] == {"val_loss": 0.5}


def test_numpy_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    """train --resume restores the NumPy RNG from last.pt: the restored stream continues identically."""
    np.random.seed(123)
    state = np.random.get_state()
    save_checkpoint(
        tmp_path / "last.pt",
        model=create_model("cnn1", 2, in_channels=1),
        config=config_from_dict({}),
        class_names=CLASSES,
        norm_stats=None,
        epoch=1,
        training_state={"rng": {"numpy": state, "python": random.getstate()}},
    )
    expected = np.random.random(5)
    np.random.seed(0)
    np.random.set_state(load_checkpoint(tmp_path / "last.pt")["training_state"]["rng"]["numpy"])
    np.testing.assert_array_equal(np.random.random(5), expected)
