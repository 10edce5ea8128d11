"""Time the vectorised bootstrap: 1,000 resamples of 100,000 binary predictions, every metric.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bootstrap.py [--items 100000] [--resamples 1000]``.
Prints a Markdown table (median and minimum of ``--repeats`` runs) for item-level and patient-level
resampling, with float64 scores (no ties) and float32 scores (ties, as real model outputs have).
Besides wall time it reports the process's CPU time: the work is single-threaded NumPy, so on a
machine shared with other jobs CPU seconds are what the run would take on a free core.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from covidscan.evaluation.bootstrap import bootstrap_metrics
from covidscan.evaluation.metrics import PredictionSet


def synthetic(n: int, dtype: type, patients: bool, seed: int = 0) -> PredictionSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * y - 0.75)))
    proba = np.c_[1 - score, score].astype(dtype)
    patient_ids = [f"p{i // 10}" for i in range(n)] if patients else []
    return PredictionSet(y, proba, ["normal", "COVID"], paths=[f"img{i}" for i in range(n)], patient_ids=patient_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{args.resamples} resamples of {args.items:,} binary predictions; all 7 metrics (accuracy, sensitivity, "
        f"specificity, precision, F1, ROC AUC, PR AUC); {os.cpu_count()} CPUs\n"
    )
    print("| resampling | scores | wall s (median) | wall s (min) | CPU s (median) |")
    print("|---|---|---:|---:|---:|")
    for patients in (False, True):
        for dtype in (np.float64, np.float32):
            predictions = synthetic(args.items, dtype, patients)
            times, cpu = [], []
            for repeat in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                bootstrap_metrics(predictions, 1, n_resamples=args.resamples, seed=repeat, by_patient=patients)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            unit = f"patients ({args.items // 10:,})" if patients else "items"
            ties = "float32 (ties)" if dtype is np.float32 else "float64 (no ties)"
            print(f"| {unit} | {ties} | {np.median(times):.2f} | {min(times):.2f} | {np.median(cpu):.2f} |")


if __name__ == "__main__":
    main()
