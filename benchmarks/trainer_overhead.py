"""Trainer overhead: images/s of covidscan's training loop vs a minimal hand-written PyTorch loop.

Both train the same registry model on the same pre-generated tensors with the same batch size,
optimizer and threads; runs alternate (trainer, loop, loop, trainer, trainer, loop, ...) so machine load
hits both alike, and each run's first epoch is a discarded warm-up. The tensors go into
``covidscan.training.TrainingLoop`` through its ordinary API (a ``DataLoader`` argument), with the
per-epoch callbacks ``train()`` uses (best + last checkpoint, history), so image decoding is not
measured, only the training engine.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trainer_overhead.py [--images 64 --batch-size 16 --rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import covidscan  # noqa: F401  (compat shim before torchvision/timm)
from covidscan.config import PhaseConfig, config_from_dict
from covidscan.models import create_model
from covidscan.runtime import seed_everything
from covidscan.training import (
    BestCheckpoint,
    Callback,
    ClassificationLoss,
    HistoryWriter,
    LastCheckpoint,
    TrainingLoop,
)

ROWS = (
    "plain PyTorch loop, images/s",
    "covidscan trainer epoch loop, images/s",
    "covidscan trainer incl. per-epoch checkpoint + history, images/s",
    "plain PyTorch loop, images per CPU-second",
    "covidscan trainer incl. checkpoint, images per CPU-second",
)


class EpochClock(Callback):
    """Wall-clock and CPU seconds between epoch ends (includes the per-epoch checkpoint and history
    writes, which run before it). CPU time is far less disturbed by other processes on a shared
    machine than wall time."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def on_fit_start(self, loop: TrainingLoop) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def on_epoch_end(self, loop: TrainingLoop, metrics: dict[str, float]) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))


def run_trainer(tensors: TensorDataset, args: argparse.Namespace, run_dir: Path) -> tuple[float, float, float]:
    """Images/s of the epoch loop (history seconds), wall images/s and images per CPU-second per epoch."""
    config = config_from_dict(
        {
            "name": "overhead",
            "data": {"image_size": args.size, "channels": 3, "normalize": "none"},
            "model": {"name": args.model},
            "training": {"batch_size": args.batch_size, "checkpoint_monitor": "loss"},
        }
    )
    seed_everything(0)
    clock = EpochClock()
    loop = TrainingLoop(
        create_model(args.model, num_classes=2, in_channels=3),
        DataLoader(tensors, batch_size=args.batch_size, shuffle=True),
        None,
        phases=[PhaseConfig(epochs=args.epochs + 1, optimizer="adam", lr=1e-4)],
        criterion=ClassificationLoss("softmax", 2),
        config=config,
        run_dir=run_dir,
        class_names=["COVID", "normal"],
        callbacks=[BestCheckpoint("loss"), HistoryWriter(), LastCheckpoint(), clock],
    )
    loop.fit()
    images = len(tensors) * args.epochs
    loop_seconds = sum(row["seconds"] for row in loop.history[1:])
    (wall_start, cpu_start), (wall_end, cpu_end) = clock.marks[1], clock.marks[-1]
    return images / loop_seconds, images / (wall_end - wall_start), images / (cpu_end - cpu_start)


def run_plain_loop(tensors: TensorDataset, args: argparse.Namespace) -> tuple[float, float]:
    """Wall images/s and images per CPU-second of the measured epochs."""
    seed_everything(0)
    model = create_model(args.model, num_classes=2, in_channels=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(tensors, batch_size=args.batch_size, shuffle=True)
    model.train()
    for epoch in range(args.epochs + 1):
        if epoch == 1:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
        for images, targets in loader:
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    images = len(tensors) * args.epochs
    return images / (time.perf_counter() - wall_start), images / (time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per run (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=4, help="trainer/loop alternations")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    tensors = TensorDataset(
        torch.randn(args.images, 3, args.size, args.size, generator=generator),
        torch.randint(0, 2, (args.images,), generator=generator),
    )
    rates: dict[str, list[float]] = {name: [] for name in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            # the order alternates, so a load that builds up or fades during a round hits both alike
            if round_index % 2:
                plain_wall, plain_cpu = run_plain_loop(tensors, args)
            loop, wall, cpu = run_trainer(tensors, args, Path(tmp) / f"run{round_index}")
            if not round_index % 2:
                plain_wall, plain_cpu = run_plain_loop(tensors, args)
            for name, value in zip(ROWS, (plain_wall, loop, wall, plain_cpu, cpu)):
                rates[name].append(value)
            # each round as it ends, so a run cut short (a time limit, a busy machine) still reports
            print(
                f"round {round_index + 1}/{args.rounds}: images/s plain {plain_wall:.2f}, trainer epoch loop "
                f"{loop:.2f}, incl. checkpoint {wall:.2f}; per CPU-second plain {plain_cpu:.2f}, trainer {cpu:.2f}",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"\n{args.model} at {args.size}x{args.size}, batch {args.batch_size}, {args.images} images x "
        f"{args.epochs} epochs x {args.rounds} rounds, {torch.get_num_threads()} torch threads\n"
    )
    print("| measurement | median | per round | ratio to plain loop |")
    print("|---|---:|---|---:|")
    for name, values in rates.items():
        base = statistics.median(rates[ROWS[3] if "CPU" in name else ROWS[0]])
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
