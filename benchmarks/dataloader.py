"""Is the trainer data-starved? DataLoader settings vs the model's consumption rate.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dataloader.py [--images 256] [--epochs 2] [--model resnet18]

1. Images/s of the 2D training pipeline (``covidscan.data.build_dataset`` with augmentation +
   ``torch.utils.data.DataLoader``) at 224x224x3 on ../shared/datasets/sarscov2-ct (synthetic
   350x260 JPEGs when it is absent) for several ``num_workers`` / ``persistent_workers`` /
   ``prefetch_factor`` / batch-size settings. Each setting iterates ``--epochs`` epochs, so
   worker start-up (what ``persistent_workers`` saves) is counted as in training.
2. The model's consumption rate: forward + backward + Adam step images/s on this machine.
A loader slower than the model starves it. ``pin_memory`` only matters with a CUDA device and is
measured only when one is present. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import covidscan  # noqa: F401  (installs the torchvision shim first)
from covidscan.config import AugmentConfig, DataConfig
from covidscan.data import build_dataset, load_samples
from covidscan.models import create_model

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@dataclass(frozen=True)
class LoaderSetting:
    num_workers: int
    batch_size: int = 32
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    pin_memory: bool = False

    def label(self) -> str:
        parts = [f"workers={self.num_workers}", f"batch={self.batch_size}"]
        if self.num_workers:
            parts += [f"persistent={self.persistent_workers}", f"prefetch={self.prefetch_factor}"]
        if self.pin_memory:
            parts.append("pin_memory")
        return ", ".join(parts)


SETTINGS = (
    LoaderSetting(0),
    LoaderSetting(1, persistent_workers=True, prefetch_factor=2),
    LoaderSetting(2, persistent_workers=False, prefetch_factor=2),
    LoaderSetting(2, persistent_workers=True, prefetch_factor=2),
    LoaderSetting(2, persistent_workers=True, prefetch_factor=4),
    LoaderSetting(2, batch_size=16, persistent_workers=True, prefetch_factor=2),
    LoaderSetting(2, batch_size=64, persistent_workers=True, prefetch_factor=2),
)


def synthetic_source(root: Path, count: int) -> Path:
    """Grayscale 350x260 JPEGs in two class folders, the size of sarscov2-ct slices."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("COVID" if i % 2 else "non-COVID")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (260, 350), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def loader_rate(dataset: torch.utils.data.Dataset, setting: LoaderSetting, epochs: int) -> float:
    """Images/s over ``epochs`` full passes, including worker start-up as a trainer sees it."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=setting.batch_size, shuffle=True, num_workers=setting.num_workers,
        persistent_workers=setting.persistent_workers, prefetch_factor=setting.prefetch_factor,
        pin_memory=setting.pin_memory)
    start = time.perf_counter()
    count = 0
    for _ in range(epochs):
        for images, _labels in loader:
            count += len(images)
    return count / (time.perf_counter() - start)


def model_rate(name: str, batch_size: int, steps: int, device: torch.device) -> float:
    """Training images/s of ``name`` at 224x224x3: forward, backward and an Adam step."""
    model = create_model(name, num_classes=2, in_channels=3).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loader setting")
    parser.add_argument("--model", nargs="+", default=["cnn1", "resnet18"], help="models whose rate is measured")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = list(SETTINGS)
    if device.type == "cuda":
        settings.append(LoaderSetting(2, persistent_workers=True, prefetch_factor=2, pin_memory=True))

    with tempfile.TemporaryDirectory() as tmp:
        source = DATASETS / "sarscov2-ct"
        if not source.is_dir():
            print(f"{source} absent: using synthetic JPEGs", file=sys.stderr)
            source = synthetic_source(Path(tmp), args.images)
        data = load_samples(source)
        samples = data.samples[:: max(1, len(data.samples) // args.images)][: args.images]
        config = DataConfig(image_size=224, channels=3, augment=AugmentConfig(rotation=10, zoom=0.1, shift=0.2,
                                                                              hflip=True))
        dataset = build_dataset(config, samples, data.class_names, train=True)
        dataset[0]  # warm-up: lazy imports and first-call set-up are not the loader's cost
        loader_rows = [(setting.label(), loader_rate(dataset, setting, args.epochs)) for setting in settings]

    model_rows = [(name, model_rate(name, 32, args.steps, device)) for name in args.model]
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, device {device}, "
          f"{len(samples)} {source.name} images x {args.epochs} epochs, 224x224x3 with augmentation\n")
    print("| DataLoader setting | images/s |")
    print("|---|---:|")
    for label, rate in loader_rows:
        print(f"| {label} | {rate:.0f} |")
    best_label, best_rate = max(loader_rows, key=lambda row: row[1])
    print("\n| model (batch 32, train step) | images/s consumed | best loader / model | data-starved? |")
    print("|---|---:|---:|---|")
    for name, rate in model_rows:
        print(f"| {name} | {rate:.1f} | {best_rate / rate:.1f}x | {'yes' if best_rate < rate else 'no'} |")
    print(f"\nbest loader setting: {best_label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
