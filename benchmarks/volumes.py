"""3D CT pipeline benchmark (study C): stack streaming and 3D training-step throughput on CPU.

Streams every stack of the 6 DICOM series of ``../shared/datasets/covid-ct-md-sample`` (depth 4,
256x256, 3 channels) in scan order and in shuffled order (as a training DataLoader draws them),
reporting stacks/s, header-indexing time and peak RSS (shuffled also with a warm
``data.volume.cache_dir``); then times training steps of resnet3d_18
at depth 4 and 16. Prints a Markdown table.

    .venv/bin/python benchmarks/volumes.py [--size 256] [--train-size 128] [--batch 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch

from covidscan.config import load_config
from covidscan.data import load_samples
from covidscan.data.volumes import VolumeStackDataset
from covidscan.models import create_model

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "covid-ct-md-sample"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mb() -> float:
    """Current resident memory (Linux /proc), to separate imports from what streaming adds."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def stream(depth: int, size: int, shuffled: bool, cache_dir: str | None = None) -> dict[str, float]:
    """One pass over every stack; with ``cache_dir`` a first untimed pass fills the disk cache."""
    config = load_config(
        None,
        [
            "data.spatial_dims=3",
            f"data.depth={depth}",
            f"data.image_size={size}",
            "data.channels=3",
            "data.normalize=none",
            f"data.volume.cache_dir={cache_dir or 'null'}",
        ],
    ).data
    samples = load_samples(SAMPLE)
    started = time.perf_counter()
    dataset = VolumeStackDataset(samples.samples, samples.class_names, config, train=False)
    indexed = time.perf_counter() - started
    before = rss_mb()
    order = list(range(len(dataset)))
    if cache_dir is not None:
        for index in order:
            dataset[index]
        dataset = VolumeStackDataset(samples.samples, samples.class_names, config, train=False)  # empty RAM cache
    if shuffled:
        random.Random(0).shuffle(order)
    started = time.perf_counter()
    for index in order:
        dataset[index]
    seconds = time.perf_counter() - started
    item_mb = 3 * depth * size * size * 4 / 2**20
    return {
        "stacks": len(dataset),
        "index_s": indexed,
        "stacks_per_s": len(dataset) / seconds,
        "all_stacks_mb": len(dataset) * item_mb,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
    }


def train_steps(depth: int, size: int, batch: int, steps: int) -> float:
    """Seconds per optimisation step (forward, backward, Adam) after one warm-up step."""
    model = create_model("resnet3d_18", num_classes=3, in_channels=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, depth, size, size), torch.randint(0, 3, (batch,))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return sum(times[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="in-plane size for streaming")
    parser.add_argument("--train-size", type=int, default=128, help="in-plane size for the training steps")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not SAMPLE.is_dir():
        raise SystemExit(f"{SAMPLE} not found")
    warnings.simplefilter("ignore")  # the sample's every-4th-file spacing warning, once per series
    print(f"torch threads: {torch.get_num_threads()}, baseline peak RSS {peak_rss_mb():.0f} MB\n")
    print(
        "| measurement | stacks | header index (s) | stacks/s | all stacks in RAM would be (MB) | RSS before (MB) "
        "| peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache_dir:
        runs = [(False, None), (True, None), (True, cache_dir)]
        results = [(shuffled, cached, stream(4, args.size, shuffled, cached)) for shuffled, cached in runs]
    for shuffled, cached, r in results:
        label = f"stream depth 4, {args.size}px, {'shuffled' if shuffled else 'scan order'}, RAM cache 4 scans" + (
            ", warm disk cache" if cached else ""
        )
        print(
            f"| {label} | {r['stacks']} | {r['index_s']:.2f} | {r['stacks_per_s']:.1f} | "
            f"{r['all_stacks_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    print()
    print("| resnet3d_18 training step | batch | input | s/step | stacks/s |")
    print("|---|---|---|---|---|")
    for depth in (4, 16):
        seconds = train_steps(depth, args.train_size, args.batch, args.steps)
        print(
            f"| depth {depth} | {args.batch} | 3x{depth}x{args.train_size}x{args.train_size} | {seconds:.2f} | "
            f"{args.batch / seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
