"""Bounded load test of ``covidscan serve``: N concurrent clients for S seconds, loopback only.

Starts the server as a subprocess on a free 127.0.0.1 port with a random-init checkpoint (weights do
not change the cost of a request), posts one CT slice in a loop from each client, stops by itself
and prints requests/s, latency percentiles and the error count (which must be 0):

    .venv/bin/python benchmarks/serving.py --model resnet18 --size 224 --clients 10 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

# benchmarks/onnx.py would shadow the `onnx` package the exporter imports: keep this folder off sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import covidscan  # noqa: E402,F401  (compat shim first)
from covidscan.checkpoint import save_checkpoint  # noqa: E402
from covidscan.config import config_from_dict  # noqa: E402
from covidscan.models import create_model  # noqa: E402

SHARED_SLICE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sarscov2-ct" / "COVID" / "Covid (1).jpg"


def sample_upload() -> tuple[str, bytes, str]:
    """A real CT slice when ../shared/datasets is present, a synthetic 350x260 JPEG otherwise."""
    if SHARED_SLICE.is_file():
        return SHARED_SLICE.name, SHARED_SLICE.read_bytes(), "image/jpeg"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (260, 350), dtype=np.uint8)).save(buffer, "JPEG")
    return "synthetic.jpg", buffer.getvalue(), "image/jpeg"


def random_checkpoint(folder: Path, model: str, size: int) -> Path:
    """A random-init run directory for a 2-class model at ``size`` px, 3 channels."""
    config = config_from_dict(
        {"name": f"{model}-bench", "data": {"image_size": size, "channels": 3}, "model": {"name": model}}
    )
    run = folder / f"{model}-bench"
    save_checkpoint(
        run / "checkpoints" / "best.pt",
        model=create_model(model, 2, in_channels=3),
        config=config,
        class_names=["COVID", "normal"],
        norm_stats=None,
        epoch=0,
    )
    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], url: str, timeout: float = 120.0) -> subprocess.Popen:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise RuntimeError("server did not become healthy in time")


async def load(url: str, clients: int, seconds: float, upload: tuple[str, bytes, str]) -> tuple[list[float], int]:
    """Each client posts, waits for the answer, posts again until the deadline (closed loop)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                response = await session.post(f"{url}/v1/predict", files={"file": upload})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=60) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return latencies, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=2, help="inference threads in the server")
    parser.add_argument("--engines", nargs="+", choices=("pytorch", "onnxruntime"), default=["pytorch", "onnxruntime"])
    args = parser.parse_args(argv)
    upload = sample_upload()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        run = random_checkpoint(Path(folder), args.model, args.size)
        for engine in args.engines:
            port = free_port()
            command = [
                sys.executable,
                "-m",
                "covidscan",
                "serve",
                "--checkpoint",
                str(run),
                "--port",
                str(port),
                "--threads",
                str(args.threads),
            ]
            if engine == "onnxruntime":
                onnx_path = Path(folder) / "model.onnx"
                if not onnx_path.exists():
                    from covidscan.serving import export_model

                    export_model(run, "onnx", onnx_path)
                command += ["--onnx", str(onnx_path)]
            url = f"http://127.0.0.1:{port}"
            server = start_server(command, url)
            try:
                latencies, errors = asyncio.run(load(url, args.clients, args.seconds, upload))
            finally:
                server.terminate()
                server.wait(timeout=30)
            ms = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99]) if latencies else [float("nan")] * 3
            rows.append(
                f"| {engine} | {len(latencies)} | {len(latencies) / args.seconds:.1f} | "
                f"{ms[0]:.0f} | {ms[1]:.0f} | {ms[2]:.0f} | {errors} |"
            )
    print(
        f"{args.model} at {args.size} px (random init), {args.clients} clients, {args.seconds:.0f} s, "
        f"{args.threads} inference threads, image {upload[0]}\n"
    )
    print("| engine | requests | requests/s | p50 (ms) | p95 (ms) | p99 (ms) | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
