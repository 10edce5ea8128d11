"""CAM time per image on CPU: resnet50 at 224 px, Grad-CAM vs Smooth Grad-CAM++ (8 noisy samples).

Run: ``.venv/bin/python benchmarks/cam.py [--model resnet50] [--size 224] [--repeats 5] [--threads N]``
Prints a Markdown table (median and min seconds per image over the repeats, after one warm-up).
Random weights: the timing of a CAM does not depend on what the model learned.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import covidscan  # noqa: F401  (torchvision compat shim before any model import)
from covidscan.explain import compute_cam
from covidscan.models import create_model, model_entry

CASES = (("gradcam", 1), ("gradcampp", 1), ("smoothgradcampp", 8))


def time_cam(model: torch.nn.Module, x: torch.Tensor, method: str, samples: int, repeats: int) -> list[float]:
    compute_cam(model, x, method, samples=samples)  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        compute_cam(model, x, method, samples=samples)
        timings.append(time.perf_counter() - start)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=3).eval()
    shape = (
        (1, 3, 16, args.size, args.size) if model_entry(args.model).spatial_dims == 3 else (1, 3, args.size, args.size)
    )
    x = torch.rand(shape)
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        forward = time.perf_counter() - start

    print(
        f"{args.model}, input {tuple(shape)}, CPU {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; plain forward {forward:.3f} s\n"
    )
    print("| method | noisy samples | median s / image | min s / image |")
    print("|---|---:|---:|---:|")
    for method, samples in CASES:
        timings = time_cam(model, x, method, samples, args.repeats)
        shown = samples if method == "smoothgradcampp" else "-"
        print(f"| {method} | {shown} | {statistics.median(timings):.3f} | {min(timings):.3f} |")


if __name__ == "__main__":
    main()
