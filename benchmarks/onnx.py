"""PyTorch eager vs ONNX Runtime on CPU: single-image latency and batched images/s, same run.

Uses a random-init checkpoint (weights do not change the cost of a forward pass), so it runs
offline anywhere:

    .venv/bin/python benchmarks/onnx.py --model resnet18 --size 224 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file would shadow the `onnx` package that the exporter imports: move its
# folder from the front of sys.path to the back (benchmarks/serving.py stays importable).
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import torch  # noqa: E402

import covidscan  # noqa: E402,F401  (compat shim first)
from covidscan.serving import export_model, load_predictor  # noqa: E402
from serving import random_checkpoint  # noqa: E402  (benchmarks/serving.py)


def time_calls(fn, batch: torch.Tensor, seconds: float, min_calls: int = 5) -> list[float]:
    """Wall-clock seconds per call, after one warm-up call, for about ``seconds`` in total."""
    fn(batch)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        run = random_checkpoint(Path(folder), args.model, args.size)
        exported = export_model(run, "onnx", Path(folder) / "model.onnx")
        engines = {
            "PyTorch eager": load_predictor(run),
            "ONNX Runtime": load_predictor(onnx=exported.path, threads=args.threads),
        }
        single = torch.rand(1, 3, args.size, args.size)
        batch = torch.rand(args.batch_size, 3, args.size, args.size)
        print(f"| engine | single-image latency p50 (ms) | p95 (ms) | images/s (batch {args.batch_size}) |")
        print("|---|---:|---:|---:|")
        for name, predictor in engines.items():
            latencies = sorted(time_calls(predictor.predict_batch, single, args.seconds))
            batches = time_calls(predictor.predict_batch, batch, args.seconds, min_calls=3)
            p95 = latencies[int(0.95 * (len(latencies) - 1))]
            print(
                f"| {name} | {1000 * statistics.median(latencies):.1f} | {1000 * p95:.1f} | "
                f"{args.batch_size / statistics.median(batches):.1f} |"
            )
        print(
            f"\n{args.model} at {args.size} px, random init, {args.threads} threads; "
            f"max |p_onnx - p_torch| = {exported.max_abs_diff:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
