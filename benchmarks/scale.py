"""Cost growth of the data path at CC-CCII scale and beyond (issue #17).

Generates synthetic CT-like slice sets (128x128 PNG, ~125 slices per patient: adjacent slices of
one patient are near-duplicates, as in a real scan; a manifest with patient ids) of each requested
size, then runs every step as a separate process and records its wall time, CPU time and peak RSS:

* ``info``, ``split`` (patient-grouped), ``audit`` (cold hash cache), ``audit --splits`` (warm
  cache: what a second audit costs), the trainer's pre-epoch leakage check (``check_split_leakage``
  on the run's split, warm cache), one training epoch of a small model (cnn1, 64 px, grayscale)
  with 0, 1 and 2 DataLoader workers, and ``predict`` over every slice;
* optionally the near-duplicate search alone (``near_duplicate_pairs``, 256-bit hashes, 24 bits) on
  ``--index-hashes`` sizes of two kinds: ``random`` (uniform hashes, 1% of them planted copies 0-24
  bits from another) and ``ct-like`` (patients of 100 slices, each 0-12 random bits from the
  patient's base hash: ~50 near-duplicate pairs per hash, the clustering real CT series show), up
  to what a million-slice archive would ask;
* optionally one epoch over 50 synthetic NIfTI volumes (64x128x128, depth 4, resnet3d_18 at 64 px).

Prints a Markdown table and the growth exponent of each step (least-squares slope of log time
against log size). Run it under the shared lock; one size at a time is fine, results accumulate in
``--results`` (JSON) and the table is printed from everything measured so far:

    flock /tmp/covidscan-heavy.lock .venv/bin/python benchmarks/scale.py --sizes 10000 40000
    flock /tmp/covidscan-heavy.lock .venv/bin/python benchmarks/scale.py --sizes 150000 --skip epoch predict
    flock /tmp/covidscan-heavy.lock .venv/bin/python benchmarks/scale.py --sizes --index-hashes 250000 1000000
    flock /tmp/covidscan-heavy.lock .venv/bin/python benchmarks/scale.py --sizes --volumes
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLICES_PER_PATIENT = 125
STEPS = ("info", "split", "audit", "audit_warm", "check", "epoch0", "epoch1", "epoch2", "predict")


def _write_patient(task: tuple[Path, int, int, int]) -> list[tuple[str, str, str]]:
    """All slices of one synthetic patient (a worker-process task)."""
    from PIL import Image

    from covidscan.data.sample import _anatomy, _slice

    root, patient, count, seed = task
    rng = np.random.default_rng([seed, patient])
    label = "COVID" if patient % 2 else "normal"
    folder = root / label / f"p{patient:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    anatomy = _anatomy(rng)
    rows = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.fromarray(_slice(rng, 128, label == "COVID", anatomy, (index + 0.5) / count)).save(path)
        rows.append((str(path.relative_to(root)), label, f"p{patient:05d}"))
    return rows


def generate(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` slices in patients of ~125, written by one process per CPU; reused when the manifest
    exists (it is written last)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    manifest = root / "manifest.csv"
    if manifest.is_file():
        return manifest
    patients = max(2, round(n / SLICES_PER_PATIENT))
    tasks = [(root, p, n // patients + (1 if p < n % patients else 0), seed) for p in range(patients)]
    with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("spawn")) as pool:
        rows = [row for rows in pool.map(_write_patient, tasks, chunksize=4) for row in rows]
    tmp = manifest.with_suffix(".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label", "patient_id"))
        writer.writerows(rows)
    tmp.replace(manifest)
    return manifest


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GB, the largest single process) and CPU seconds (user + system, the
    process and the worker processes it waited for) of one command: on a shared machine the CPU
    time shows what the step itself cost when the wall time is inflated by other jobs."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1e6, usage.ru_utime + usage.ru_stime


CHECK = """
import sys
from covidscan.config import SplitConfig
from covidscan.data import load_samples, assign_splits
from covidscan.data.audit import check_split_leakage
data = assign_splits(load_samples(sys.argv[1]), SplitConfig(method="file", file=sys.argv[2]), 0)
check_split_leakage(data, progress=False)
"""

EPOCH = """
import sys, torch
from covidscan.config import SplitConfig, config_from_dict
from covidscan.data import assign_splits, build_dataset, load_samples
from covidscan.models import create_model
manifest, splits, workers, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
config = config_from_dict({"data": {"image_size": 64, "channels": 1, "normalize": "sample", "num_workers": workers}})
data = assign_splits(load_samples(manifest), SplitConfig(method="file", file=splits), 0)
train = [s for s in data.samples if s.split == "train"]
dataset = build_dataset(config.data, train, data.class_names, train=True)
loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers,
                                     persistent_workers=False, multiprocessing_context="spawn" if workers else None)
model = create_model("cnn1", len(data.class_names), in_channels=1)
optimizer = torch.optim.Adam(model.parameters(), 1e-3)
model.train()
for images, labels in loader:
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
if out != "-":
    from covidscan.checkpoint import save_checkpoint
    save_checkpoint(out, model=model, config=config, class_names=data.class_names, norm_stats=None, epoch=1,
                    metrics={})
"""

INDEX = """
import json, resource, sys, time, numpy as np
from covidscan.data.hashindex import near_duplicate_pairs, plan_join
n, kind = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)

def flip(codes, distances):  # XOR each row with up to `distances` random bits (a position may repeat)
    rows = np.arange(len(codes))
    for step in range(int(distances.max(initial=0))):
        bit = rng.integers(0, 256, len(codes))
        codes[rows, bit // 64] ^= (np.uint64(1) << (bit % 64).astype(np.uint64)) * (step < distances)
    return codes

if kind == "random":  # uniform 256-bit hashes, 1% of them planted copies 0-24 bits from another
    hashes = rng.integers(0, 2**64, size=(n, 4), dtype=np.uint64, endpoint=False)
    copies = rng.permutation(n)[: 2 * (n // 100)].reshape(2, -1)
    hashes[copies[1]] = flip(hashes[copies[0]].copy(), rng.integers(0, 25, copies.shape[1]))
else:  # CT-like: patients of 100 slices, each 0-12 random bits from the patient's base hash, shuffled
    bases = rng.integers(0, 2**64, size=(-(-n // 100), 4), dtype=np.uint64, endpoint=False)
    hashes = flip(bases[np.arange(n) // 100], rng.integers(0, 13, n))[rng.permutation(n)]
start, cpu = time.perf_counter(), time.process_time()
pairs = near_duplicate_pairs(hashes, 24)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
plan = " + ".join(f"{t.bits}b/r{t.radius}" for t in plan_join(n, 256, 24).tables)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps({"seconds": wall, "cpu_seconds": cpu, "peak_gb": peak, "pairs": len(pairs), "plan": plan}))
"""

VOLUMES = """
import sys, torch, numpy as np, nibabel as nib
from pathlib import Path
from covidscan.config import config_from_dict
from covidscan.data import Sample, build_dataset
from covidscan.models import create_model
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
samples = []
for k in range(50):
    path = root / f"scan{k:02d}.nii.gz"
    if not path.is_file():
        hu = rng.normal(-700, 200, (128, 128, 64)).astype(np.float32)
        nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 5.0, 1.0])), path)
    samples.append(Sample(str(path), "COVID" if k % 2 else "normal", f"p{k}"))
config = config_from_dict({"data": {"spatial_dims": 3, "depth": 4, "image_size": 64, "channels": 1,
                                    "normalize": "sample", "volume": {"cache_dir": str(root / "cache")}},
                           "model": {"name": "resnet3d_18"}})
dataset = build_dataset(config.data, samples, ["COVID", "normal"], train=True)
loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
model = create_model("resnet3d_18", 2, in_channels=1)
optimizer = torch.optim.Adam(model.parameters(), 1e-3)
for stacks, labels in loader:
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(stacks), labels).backward()
    optimizer.step()
print(len(dataset))
"""


def run_size(n: int, work: Path, skip: set[str], env: dict[str, str]) -> dict[str, tuple[float, float, float]]:
    python = [sys.executable]
    cli = [*python, "-m", "covidscan"]
    folder = work / f"set-{n}"
    print(f"[{n}] generating (reused when present) ...", flush=True)
    manifest = generate(folder, n)
    splits, checkpoint = folder / "splits.csv", folder / "cnn1.pt"
    cache = {**env, "COVIDSCAN_CACHE": str(folder / "cache")}
    commands = {
        "info": [*cli, "data", "info", str(manifest)],
        "split": [*cli, "data", "split", str(manifest), "--out", str(splits)],
        "audit": [*cli, "data", "audit", str(manifest)],
        "audit_warm": [*cli, "data", "audit", str(manifest), "--splits", str(splits)],
        "check": [*python, "-c", CHECK, str(manifest), str(splits)],
        "epoch0": [*python, "-c", EPOCH, str(manifest), str(splits), "0", str(checkpoint)],
        "epoch1": [*python, "-c", EPOCH, str(manifest), str(splits), "1", "-"],
        "epoch2": [*python, "-c", EPOCH, str(manifest), str(splits), "2", "-"],
        "predict": [
            *cli,
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--input",
            str(folder),
            "--out",
            str(folder / "predictions.csv"),
        ],
    }
    results = {}
    for step, command in commands.items():
        if step in skip or (step == "predict" and "epoch0" in skip and not checkpoint.is_file()):
            continue
        if step == "audit":
            for leftover in (folder / "cache").glob("audit-hashes.sqlite*"):  # cold: every image hashed
                leftover.unlink()
        if step == "predict":
            (folder / "predictions.csv").unlink(missing_ok=True)  # predict resumes; measure a full run
        results[step] = measure(command, cache)
        wall, rss, cpu = results[step]
        print(f"[{n}] {step}: {wall:.1f} s (CPU {cpu:.1f} s), {rss:.2f} GB", flush=True)
    return results


def exponent(sizes: list[int], seconds: list[float]) -> float | None:
    if len(sizes) < 2:
        return None
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def _cell(wall: float, rss: float, cpu: float | None = None) -> str:
    return f"{wall:.1f} s" + (f" (CPU {cpu:.1f} s)" if cpu is not None else "") + f", {rss:.2f} GB"


def table(results: dict) -> str:
    sizes = sorted(int(n) for n in results["sizes"])
    head = "| step | " + " | ".join(f"{n:,} slices" for n in sizes) + " | growth exponent |"
    lines = [head, "|---" * (len(sizes) + 2) + "|"]
    for step in STEPS:
        measured = [(n, results["sizes"][str(n)].get(step)) for n in sizes]
        cells = [_cell(*v) if v else "—" for _, v in measured]  # older results have no CPU time
        points = [(n, v[0]) for n, v in measured if v]
        slope = exponent([n for n, _ in points], [t for _, t in points])
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {'—' if slope is None else f'{slope:.2f}'} |")
    return "\n".join(lines)


def index_table(results: dict) -> str:
    """One row per kind of hashes: search time (CPU), peak RSS and pairs per size, and the growth
    exponent of the wall time and of the CPU time."""
    lines = []
    for kind, by_size in sorted(results.get("index", {}).items()):
        sizes = sorted(int(n) for n in by_size)
        if not lines:
            lines += ["| hashes | size | search wall (CPU) | peak RSS | pairs | plan |", "|---|---|---|---|---|---|"]
        for n in sizes:
            r = by_size[str(n)]
            lines.append(
                f"| {kind} | {n:,} | {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s) | {r['peak_gb']:.2f} GB | "
                f"{r['pairs']:,} | {r['plan']} |"
            )
        for a, b in itertools.pairwise(sizes):
            wall = exponent([a, b], [by_size[str(a)]["seconds"], by_size[str(b)]["seconds"]])
            cpu = exponent([a, b], [by_size[str(a)]["cpu_seconds"], by_size[str(b)]["cpu_seconds"]])
            lines.append(f"| {kind} | {a:,} → {b:,} | growth exponent {wall:.2f} (CPU {cpu:.2f}) | | | |")
    return "\n".join(lines)


def run_index(n: int, kind: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", INDEX, str(n), kind], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout)
    print(
        f"index alone, {n:,} {kind} hashes: {result['seconds']:.1f} s (CPU {result['cpu_seconds']:.1f} s), "
        f"{result['peak_gb']:.2f} GB, {result['pairs']:,} pairs",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 40_000, 150_000])
    parser.add_argument("--work", default="/tmp/covidscan-scale", help="where the synthetic sets live (reused)")
    parser.add_argument("--results", default=None, help="JSON of accumulated results (default WORK/results.json)")
    parser.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out")
    parser.add_argument(
        "--index-hashes",
        type=int,
        nargs="*",
        default=[],
        help="also time the near-duplicate search alone on these sizes",
    )
    parser.add_argument(
        "--index-kinds", nargs="+", default=["random", "ct-like"], choices=["random", "ct-like"], help="hashes to time"
    )
    parser.add_argument("--volumes", action="store_true", help="also time one epoch over 50 NIfTI volumes")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results) if args.results else work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"sizes": {}, "extra": {}}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    for n in args.sizes:
        results["sizes"].setdefault(str(n), {}).update(run_size(n, work, set(args.skip), env))
        results_path.write_text(json.dumps(results, indent=1))
    for n in args.index_hashes:
        for kind in args.index_kinds:
            results.setdefault("index", {}).setdefault(kind, {})[str(n)] = run_index(n, kind, env)
            results_path.write_text(json.dumps(results, indent=1))
    if args.volumes:
        folder = work / "volumes"
        folder.mkdir(exist_ok=True)
        wall, rss, cpu = measure([sys.executable, "-c", VOLUMES, str(folder)], env)
        results["extra"]["volumes_epoch"] = {"seconds": wall, "peak_gb": rss, "cpu_seconds": cpu}
        print(f"one epoch, 50 NIfTI volumes (64x128x128, depth 4): {_cell(wall, rss, cpu)}", flush=True)
    results["machine"] = f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    results["date"] = str(date.today())
    results_path.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(index_table(results))
    print(json.dumps(results["extra"], indent=1))


if __name__ == "__main__":
    main()
