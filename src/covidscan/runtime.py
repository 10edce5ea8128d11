"""Run directories, seeding, devices and environment capture: what makes a run reproducible."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from covidscan.config import RunConfig

_REPORTED_PACKAGES = (
    "covidscan",
    "torch",
    "torchvision",
    "timm",
    "monai",
    "numpy",
    "scikit-learn",
    "pydicom",
    "pillow",
    "nibabel",
)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def process_rank() -> int:
    """This process's global rank in a distributed run (0 outside one): the one rank check everywhere.

    The joined process group's rank when there is one, otherwise the ``RANK`` that ``torchrun`` sets
    (``WORLD_SIZE`` > 1), so the answer is right before the group is joined and after it is left.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return 0


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 inside one: the process that writes files and logs."""
    return process_rank() == 0


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use --set training.device=cpu")
    return device


def environment_info() -> dict[str, Any]:
    """Versions and hardware, saved with every run so a figure can be traced to its machine."""
    packages = {}
    for name in _REPORTED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": packages,
        "command": " ".join(sys.argv),
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it onto ``path`` once the block succeeds.

    Every file covidscan writes goes through here, so an interrupted run never leaves half a file and
    never destroys the previous version. The temporary name keeps the suffix (savefig and np.save
    read the format from it) and carries the process id (DataLoader workers may race).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, payload: Any) -> Path:
    return write_text(path, json.dumps(payload, indent=2, default=str))


def create_run_dir(config: RunConfig, run_dir: str | Path | None = None) -> Path:
    """Make ``<output_dir>/<name>-<timestamp>`` (or ``run_dir``) holding the resolved config and
    environment; an existing directory is reused only when it is given explicitly (resume)."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.output_dir) / f"{config.name}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = Path(config.output_dir) / f"{config.name}-{stamp}-{suffix}"
    run_dir = Path(run_dir)
    for sub in ("checkpoints", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    write_json(run_dir / "environment.json", environment_info())
    return run_dir
