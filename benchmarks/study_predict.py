"""Whole-study prediction: wall time and peak memory for one synthetic 300-slice 512x512 CT series.

Each row runs in a fresh process, as `covidscan predict --studies` does: import covidscan, load the
model, then `predict_study` (decode the DICOM series, preprocess, predict, aggregate). Rows: a 2D
model at 224 px predicting every slice, and a 3D model at depth 4 predicting every slice stack,
each with PyTorch eager and with ONNX Runtime. Models are random-init (weights do not change the
cost of a forward pass), so it runs offline anywhere:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/study_predict.py --threads 2

Targets on 2 cores (issue #13): the 2D model with ONNX Runtime <= 30 s per study; peak RSS <= one
decoded volume (300 x 512 x 512 float32 = 300 MiB) + 500 MB.

API rows: `POST /v1/studies` to a real ``covidscan serve --onnx`` process on loopback (the ONNX export
of each model), the series posted as one zip; peak RSS is the server's own (the client's copy of
the upload is not counted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

STARTED = time.perf_counter()
HERE = Path(__file__).resolve().parent
# Run as a script, this folder would shadow the `onnx` package (benchmarks/onnx.py): move it to the back.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

VOLUME_MIB = 300 * 512 * 512 * 4 / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    over an exec, so a child started from a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark measures memory on Linux)")


def write_series(folder: Path, slices: int, side: int) -> Path:
    """A CT series written slice by slice (the parent never holds the volume)."""
    import numpy as np
    from pydicom.uid import generate_uid

    from covidscan.data.synthetic import write_dicom_slice

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    series, study = generate_uid(), generate_uid()
    for k in range(slices):
        hu = np.clip(rng.normal(-600, 300, (side, side)), -1024, 2000)
        write_dicom_slice(folder / f"slice_{k:04d}.dcm", hu, 1.0 * k, series_uid=series, study_uid=study, thickness=1.0)
    return folder


def make_model(root: Path, name: str, model: str, size: int, data: dict) -> Path:
    import torch

    from covidscan.checkpoint import save_checkpoint
    from covidscan.config import config_from_dict
    from covidscan.models import create_model

    config = config_from_dict(
        {"name": name, "data": {"image_size": size, "channels": 3, **data}, "model": {"name": model}}
    )
    torch.manual_seed(0)
    run = root / name
    save_checkpoint(
        run / "checkpoints" / "best.pt",
        model=create_model(model, 2, in_channels=3),
        config=config,
        class_names=["COVID", "normal"],
        norm_stats=None,
        epoch=1,
    )
    return run


def predict_child(model: str, series: str, threads: int) -> dict:
    """One row, in this (fresh) process: load the model, predict the study."""
    import torch

    import covidscan  # noqa: F401
    from covidscan.inference import load_predictor, predict_study

    torch.set_num_threads(threads)
    imported = time.perf_counter()
    predictor = load_predictor(model, threads=threads)
    loaded = time.perf_counter()
    result = predict_study(predictor, series, batch_size=16)
    done = time.perf_counter()
    return {
        "import_s": imported - STARTED,
        "load_s": loaded - imported,
        "study_s": done - loaded,
        "total_s": done - STARTED,
        "items": len(result.items),
        "peak_rss_mib": peak_rss_mib(),
        "engine": predictor.engine,
    }


def peak_rss_of(pid: int) -> float:
    """Peak resident memory (VmHWM) of another live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def api_row(model: Path, series: Path, threads: int, folder: Path) -> dict:
    """`POST /v1/studies` of the series as one zip to a real `covidscan serve` process, as deployed.

    The server's own peak RSS is read from /proc after the answer, so the client's copy of the
    upload is not counted; "request s" is upload + decode + predict + answer, on loopback."""
    import httpx

    archive = folder / "study.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for file in sorted(series.iterdir()):
            handle.write(file, file.name)
    port = free_port()
    command = [sys.executable, "-m", "covidscan", "serve", "--onnx", str(model), "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"covidscan serve exited: {server.stderr.read()[-3000:] if server.stderr else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("covidscan serve did not start within 120 s")
            time.sleep(0.5)
        idle_mib = peak_rss_of(server.pid)
        start = time.perf_counter()
        with archive.open("rb") as body:
            response = httpx.post(
                f"{url}/v1/studies", files={"file": ("study.zip", body, "application/zip")}, timeout=600
            )
        elapsed = time.perf_counter() - start
        return {
            "status": response.status_code,
            "request_s": elapsed,
            "peak_rss_mib": peak_rss_of(server.pid),
            "idle_rss_mib": idle_mib,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_child(model: Path, series: Path, threads: int) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", str(model), str(series), "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"predict child failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--model2d", default="resnet18")
    parser.add_argument("--model3d", default="resnet3d_18")
    parser.add_argument("--size", type=int, default=224, help="model input side, 2D and 3D")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "SERIES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, series = args.child
        print(json.dumps(predict_child(model, series, args.threads)))
        return 0

    import covidscan  # noqa: F401
    from covidscan.serving import export_model

    with tempfile.TemporaryDirectory(prefix="covidscan-bench-") as folder:
        root = Path(folder)
        series = write_series(root / "series", args.slices, args.side)
        models = {
            f"2D {args.model2d} {args.size} px": make_model(root, "m2d", args.model2d, args.size, {}),
            f"3D {args.model3d} {args.size} px, depth {args.depth}": make_model(
                root, "m3d", args.model3d, args.size, {"spatial_dims": 3, "depth": args.depth, "normalize": "sample"}
            ),
        }
        print(
            f"{args.slices} x {args.side} x {args.side} synthetic DICOM series (uncompressed, "
            f"{sum(f.stat().st_size for f in series.iterdir()) / 2**20:.0f} MiB on disk; decoded float32 volume "
            f"{args.slices * args.side**2 * 4 / 2**20:.0f} MiB); {args.threads} threads; random-init models\n"
        )
        print("| model | engine | items | study s | load s | total command s | peak RSS MiB |")
        print("|---|---|---:|---:|---:|---:|---:|")
        api_rows = []
        for name, run in models.items():
            onnx = export_model(run, "onnx", root / f"{run.name}.onnx").path
            for source in (run, onnx):
                row = run_child(source, series, args.threads)
                print(
                    f"| {name} | {row['engine']} | {row['items']} | {row['study_s']:.1f} | {row['load_s']:.1f} | "
                    f"{row['total_s']:.1f} | {row['peak_rss_mib']:.0f} |",
                    flush=True,
                )
            api_rows.append((name, api_row(onnx, series, args.threads, root)))
        print()
        for name, row in api_rows:
            print(
                f"API, {name}, ONNX Runtime: HTTP {row['status']}, {row['request_s']:.1f} s per study, "
                f"server peak RSS {row['peak_rss_mib']:.0f} MiB (started and idle: {row['idle_rss_mib']:.0f} MiB)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
