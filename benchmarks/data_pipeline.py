"""Data-pipeline speed: 2D decode + resize + augment throughput, and DICOM series loading cost.

Run: .venv/bin/python benchmarks/data_pipeline.py [--images 384] [--slices 300]

1. Images/s through ``build_dataset`` + ``DataLoader`` on ../shared/datasets/sarscov2-ct (JPEG,
   ~350x260), resized to 224x224 without augmentation, with study A's augmentation (rotation 10,
   zoom 0.1, shift 0.2, h-flip), and with study A's plus the ``robust`` preset and CLAHE
   (``data.intensity: clahe``), for num_workers 0 and 2.
2. ``read_dicom_series`` on a synthetic 300-slice 512x512 CT series (uncompressed 16-bit: pydicom
   cannot encode JPEG-lossless, so decode cost is not included; see row 3), wall time and peak
   memory (tracemalloc peak of Python/NumPy allocations, and the process's peak RSS increase).
3. Real JPEG-lossless decoding speed on ../shared/datasets/covid-ct-md-sample (slices/s).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import torch

import covidscan  # noqa: F401  (installs the torchvision shim first)
from covidscan.config import AugmentConfig, DataConfig
from covidscan.data import build_dataset, load_samples, read_dicom_series
from covidscan.data.synthetic import write_dicom_slice

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


STUDY_A = {"rotation": 10, "zoom": 0.1, "shift": 0.2, "hflip": True}
PIPELINES = {  # name -> (data.augment, data.intensity)
    "no augmentation": ({}, "none"),
    "augmented (study A)": (STUDY_A, "none"),
    "study A + robust preset + CLAHE": ({**STUDY_A, "preset": "robust"}, "clahe"),
}


def throughput(samples, class_names, pipeline: str, workers: int, batch_size: int = 32) -> float:
    augment, intensity = PIPELINES[pipeline]
    config = DataConfig(
        image_size=224, channels=3, num_workers=workers, augment=AugmentConfig(**augment), intensity=intensity
    )
    dataset = build_dataset(config, samples, class_names, train=bool(augment))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - start)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dicom_series_cost(slices: int, size: int = 512) -> dict[str, float]:
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(0)
    noise = rng.integers(-1024, 1500, size=(size, size)).astype(np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        order, uid = rng.permutation(slices), generate_uid()
        for k in range(slices):  # slice by slice: the benchmark itself must not hold the volume
            write_dicom_slice(folder / f"slice_{order[k]:04d}.dcm", noise + k % 7, float(k), series_uid=uid)
        rss_before = max_rss_mb()
        tracemalloc.start()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = read_dicom_series(folder)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {
            "seconds": seconds,
            "peak_mb": peak / 2**20,
            "rss_increase_mb": max_rss_mb() - rss_before,
            "volume_mb": volume.hu.nbytes / 2**20,
            "shape": volume.hu.shape,
        }


def real_jpeg_lossless_rate() -> float | None:
    from covidscan.data.io import read_dicom

    files = sorted((DATASETS / "covid-ct-md-sample").rglob("*.dcm"))[:40]
    if not files:
        return None
    start = time.perf_counter()
    for file in files:
        read_dicom(file)
    return len(files) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384, help="sarscov2-ct images per throughput run")
    parser.add_argument("--slices", type=int, default=300, help="slices of the synthetic DICOM series")
    args = parser.parse_args()
    torch.set_num_threads(1)  # DataLoader workers are the parallelism being measured
    rows = []
    source = DATASETS / "sarscov2-ct"
    if source.is_dir():
        data = load_samples(source)
        samples = data.samples[:: max(1, len(data.samples) // args.images)][: args.images]
        for pipeline in PIPELINES:
            for workers in (0, 2):
                rate = throughput(samples, data.class_names, pipeline, workers)
                rows.append(
                    (
                        f"sarscov2-ct JPEG -> 224x224x3, {pipeline}, num_workers={workers}",
                        f"{rate:.0f} images/s",
                        f"{len(samples)} images",
                    )
                )
    else:
        print(f"{source} absent: skipping the throughput rows", file=sys.stderr)
    cost = dicom_series_cost(args.slices)
    rows.append(
        (
            f"read_dicom_series, synthetic {cost['shape'][0]}x{cost['shape'][1]}x{cost['shape'][2]} "
            "uncompressed 16-bit, shuffled file names",
            f"{cost['seconds']:.2f} s",
            f"peak {cost['peak_mb']:.0f} MiB traced (volume {cost['volume_mb']:.0f} MiB float32), "
            f"peak RSS +{cost['rss_increase_mb']:.0f} MiB",
        )
    )
    rate = real_jpeg_lossless_rate()
    if rate is not None:
        rows.append(
            (
                "read_dicom, real JPEG-lossless 512x512 slices (covid-ct-md-sample)",
                f"{rate:.1f} slices/s",
                f"{args.slices} such slices: ~{args.slices / rate:.0f} s decode",
            )
        )
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch threads 1\n")
    print("| measurement | result | notes |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
