"""Is the trainer data-starved? DataLoader settings vs the model's consumption rate.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dataloader.py [--images 128] [--epochs 2] [--model cnn1 resnet18]

1. Images/s of the 2D training pipeline (``covidscan.data.build_dataset`` with augmentation +
   ``torch.utils.data.DataLoader``) at 224x224x3 on ../shared/datasets/sarscov2-ct (synthetic
   350x260 JPEGs when it is absent) for several ``num_workers`` / ``persistent_workers`` /
   ``prefetch_factor`` / batch-size settings. Each setting iterates ``--epochs`` epochs, so
   worker start-up (what ``persistent_workers`` saves) is counted as in training.
2. The model's consumption rate: forward + backward + Adam step images/s on random tensors.
3. The same training step fed by the DataLoader (in-process vs one worker): a rate well below
   row 2's means the model waits for data.
A loader slower than the model starves it. ``pin_memory`` only matters with a CUDA device and is
measured only when one is present. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterator
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
    torch_threads: int | None = None  # intra-op threads of the loading process (None: torch's default)

    def label(self) -> str:
        parts = [f"workers={self.num_workers}", f"batch={self.batch_size}"]
        if self.torch_threads:
            parts.append(f"{self.torch_threads} torch thread")
        if self.num_workers:
            parts += [f"persistent={self.persistent_workers}", f"prefetch={self.prefetch_factor}"]
        if self.pin_memory:
            parts.append("pin_memory")
        return ", ".join(parts)


SETTINGS = (
    LoaderSetting(0),
    LoaderSetting(0, torch_threads=1),  # DataLoader workers run with 1 thread; in-process loading does not
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
        dataset,
        batch_size=setting.batch_size,
        shuffle=True,
        num_workers=setting.num_workers,
        persistent_workers=setting.persistent_workers,
        prefetch_factor=setting.prefetch_factor,
        pin_memory=setting.pin_memory,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(setting.torch_threads or threads)
    start = time.perf_counter()
    count = 0
    for _ in range(epochs):
        for images, _labels in loader:
            count += len(images)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return count / seconds


def training_rate(
    name: str, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, device: torch.device
) -> float:
    """Training images/s of ``name``: forward, backward and an Adam step on each batch, after one
    warm-up step (allocator, kernels). Fed fixed random tensors this is the model's consumption
    rate; fed by a DataLoader it is what a training epoch achieves."""
    model = create_model(name, num_classes=2, in_channels=3).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(images: torch.Tensor, labels: torch.Tensor) -> int:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        return len(images)

    step(*next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    count = sum(step(*next(batches)) for _ in range(steps))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def random_batches(batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = torch.randn(batch_size, 3, 224, 224), torch.randint(0, 2, (batch_size,))
    return itertools.repeat((images, labels))


def loader_batches(
    dataset: torch.utils.data.Dataset, setting: LoaderSetting
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=setting.batch_size,
        shuffle=True,
        num_workers=setting.num_workers,
        pin_memory=setting.pin_memory,
        persistent_workers=setting.persistent_workers,
        prefetch_factor=setting.prefetch_factor,
    )
    return itertools.chain.from_iterable(itertools.repeat(loader))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="images per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loader setting")
    parser.add_argument("--model", nargs="+", default=["cnn1", "resnet18"], help="models whose rate is measured")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per measurement")
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
        config = DataConfig(
            image_size=224, channels=3, augment=AugmentConfig(rotation=10, zoom=0.1, shift=0.2, hflip=True)
        )
        dataset = build_dataset(config, samples, data.class_names, train=True)
        dataset[0]  # warm-up: lazy imports and first-call set-up are not the loader's cost
        loader_rows = [(setting.label(), loader_rate(dataset, setting, args.epochs)) for setting in settings]
        model_rows = [(name, training_rate(name, random_batches(32), args.steps, device)) for name in args.model]
        # End to end: the first model fed by the loader, measured next to the no-loading rate so
        # that load changes on a shared machine hit all three rows alike.
        fed = {"random tensors (no data loading)": lambda: random_batches(32)}
        for setting in (LoaderSetting(0), LoaderSetting(1, persistent_workers=True, prefetch_factor=2)):
            fed[setting.label()] = lambda setting=setting: loader_batches(dataset, setting)
        fed_rows = [
            (label, training_rate(args.model[0], batches(), args.steps, device)) for label, batches in fed.items()
        ]

    print(
        f"\nmachine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, device {device}, "
        f"{len(samples)} {source.name} images x {args.epochs} epochs, 224x224x3 with augmentation\n"
    )
    print("| DataLoader setting | images/s |")
    print("|---|---:|")
    for label, rate in loader_rows:
        print(f"| {label} | {rate:.0f} |")
    best_label, best_rate = max(loader_rows, key=lambda row: row[1])
    print("\n| model (batch 32, train step) | images/s consumed | best loader / model | data-starved? |")
    print("|---|---:|---:|---|")
    for name, rate in model_rows:
        print(f"| {name} | {rate:.1f} | {best_rate / rate:.1f}x | {'yes' if best_rate < rate else 'no'} |")
    print(f"\nbest loader setting: {best_label}\n")
    print(f"| {args.model[0]} trained from the DataLoader (batch 32) | images/s | vs random tensors |")
    print("|---|---:|---:|")
    for label, rate in fed_rows:
        print(f"| {label} | {rate:.1f} | {rate / fed_rows[0][1]:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
