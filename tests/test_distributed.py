"""DDP: two gloo CPU processes train exactly what one process trains with the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from covidscan.config import config_from_dict
from covidscan.models import ClassifierModel
from covidscan.training import train
from covidscan.training.distributed import DistContext, env_context
from helpers import registered_model, write_image_folder


def ddp_test_net(num_classes: int, in_channels: int = 1, pretrained: bool = False, weights: str | None = None):
    backbone = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    return ClassifierModel(backbone, head)


def _config(source: Path, tmp_path: Path):
    # 16 train images, global batch 8: two full batches per epoch for one process, 4 + 4 per rank for two
    return config_from_dict(
        {
            "name": "ddp",
            "output_dir": str(tmp_path / "runs"),
            "data": {
                "source": str(source),
                "image_size": 32,
                "channels": 1,
                "normalize": "sample",
                "split": {"method": "stratified", "ratios": [0.5, 0.5, 0.0]},
            },
            "model": {"name": "ddp_test_net"},
            "training": {"batch_size": 8, "phases": [{"epochs": 2, "optimizer": "sgd", "lr": 0.05}]},
        }
    )


def _worker(rank: int, world_size: int, port: int, source: str, tmp_path: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    with registered_model("ddp_test_net", ddp_test_net):  # a spawned process starts with the built-ins only
        train(_config(Path(source), Path(tmp_path)), run_dir=Path(tmp_path) / "ddp")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_env_context_reads_torchrun_variables(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_context() == DistContext()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    context = env_context()
    assert (context.rank, context.world_size, context.local_rank, context.is_main) == (3, 4, 1, False)


def test_two_gloo_processes_match_single_process_training(tmp_path):
    source = write_image_folder(tmp_path / "images", {"COVID": 16, "normal": 16})
    with registered_model("ddp_test_net", ddp_test_net):
        single = train(_config(source, tmp_path), run_dir=tmp_path / "single")
    mp.spawn(_worker, args=(2, _free_port(), str(source), str(tmp_path)), nprocs=2, join=True)

    ddp_dir = tmp_path / "ddp"
    for name in ("history.csv", "metrics.json", "checkpoints/best.pt", "plots/loss.png"):
        assert (ddp_dir / name).is_file(), name
    ddp_history = torch.load(ddp_dir / "checkpoints" / "last.pt", weights_only=False)["training_state"]["history"]
    for got, want in zip(ddp_history, single.history, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    ddp_weights = torch.load(ddp_dir / "checkpoints" / "last.pt", weights_only=False)["state_dict"]
    single_weights = torch.load(single.run_dir / "checkpoints" / "last.pt", weights_only=False)["state_dict"]
    for key, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-4, atol=1e-6)
