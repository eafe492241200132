"""Load generator for the service: requests/s and p50/p95/p99 latency at several concurrencies.

    .venv/bin/python benchmarks/serve_bench.py --concurrency 1 8 32 --seconds 20

Starts the service once per variant on a free loopback port (``VARIANTS``: models in the API
process or in a separate engine service, adaptive batching on or off), measures first the
ceiling (the served cifar10 model's own batched ONNX Runtime throughput on pre-decoded tensors,
in this process) and then drives ``/classify`` (one 32x32 JPEG per request) and
``/classify_batch`` (``--files`` JPEGs per request) with a bounded number of requests for a
bounded time. ``--models-dir`` serves another registry (e.g. a ResNet-18 export, to compare with
the figures in the issue); ``--url`` measures an already running server instead. Only loopback
addresses are accepted as targets. Results: a Markdown table on stdout and JSON in ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from score_bench import ceiling  # noqa: E402  (the same ceiling as the scoring benchmark)

VARIANTS = {
    "inprocess": {"IMGCLF_ENGINE": "inprocess"},  # the default on CPU hosts
    "inprocess-unbatched": {"IMGCLF_ENGINE": "inprocess", "IMGCLF_BATCHING": "0"},
    "service": {"IMGCLF_ENGINE": "service"},  # the default on GPU hosts
    "service-unbatched": {"IMGCLF_ENGINE": "service", "IMGCLF_BATCHING": "0"},
}


def sample_jpegs(count: int) -> list[bytes]:
    """Real CIFAR-10 test JPEGs when the archive is here, else synthetic 32x32 JPEGs."""
    try:
        from training.data import extract_archive, shared_datasets_dir

        folder = extract_archive(shared_datasets_dir() / "cifar10-jpeg.tar.gz") / "cifar10-jpeg" / "test"
        files = sorted(folder.glob("*/*.jpg"))[:: max(1, 10_000 // count)][:count]
        return [f.read_bytes() for f in files]
    except FileNotFoundError:
        from PIL import Image

        out = []
        for i in range(count):
            buffer = io.BytesIO()
            Image.effect_noise((32, 32), 40 + i % 50).convert("RGB").save(buffer, "JPEG")
            out.append(buffer.getvalue())
        return out


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    address = socket.gethostbyname(host)
    if not ipaddress.ip_address(address).is_loopback:
        raise SystemExit(f"refusing to load-test {host} ({address}): loopback targets only")


async def drive(url: str, path: str, bodies: list[list[tuple[str, bytes]]], concurrency: int,
                seconds: float, max_requests: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    why: dict[str, int] = {}
    images = 0
    stop_at = time.perf_counter() + seconds
    sent = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures, images, sent
        while time.perf_counter() < stop_at and sent < max_requests:
            body = bodies[sent % len(bodies)]
            sent += 1
            form = aiohttp.FormData()
            for field, data in body:
                form.add_field(field, data, filename="x.jpg", content_type="image/jpeg")
            began = time.perf_counter()
            try:
                async with session.post(url + path, data=form) as response:
                    await response.read()
                    ok = response.status == 200
                    reason = str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                ok, reason = False, type(exc).__name__
            if ok:
                latencies.append(time.perf_counter() - began)
                images += len(body)
            else:
                failures += 1
                why[reason] = why.get(reason, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"path": path, "concurrency": concurrency, "requests": len(latencies), "failures": failures,
            "seconds": round(elapsed, 2), "requests_per_s": round(len(latencies) / elapsed, 1),
            "images_per_s": round(images / elapsed, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1), "failure_reasons": why}


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_bench-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service.serve", "--port", str(port), "--host", "127.0.0.1"],
                            cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(240):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server did not start; see {log.name}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="measure this running server (loopback only) instead")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per measurement")
    parser.add_argument("--files", type=int, default=32, help="JPEGs per /classify_batch request")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["inprocess", "inprocess-unbatched", "service"])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--ceiling-images", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    jpegs = sample_jpegs(256)
    single = [[("image", j)] for j in jpegs]
    multi = [[("images", jpegs[(i + k) % len(jpegs)]) for k in range(args.files)] for i in range(16)]
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
              "models_dir": str(args.models_dir),
              "ceiling_images_per_s": round(ceiling(args.models_dir / "cifar10", args.ceiling_images, 128), 1), "runs": []}
    print(f"ceiling (batched ONNX Runtime, pre-decoded): {report['ceiling_images_per_s']} images/s", flush=True)
    for name in (["given"] if args.url else args.variants):
        proc = None
        if args.url:
            require_loopback(args.url)
            url = args.url
        else:
            proc, url = start_server({**VARIANTS[name], "IMGCLF_MODELS_DIR": str(args.models_dir)})
        try:
            for path, bodies in (("/classify", single), ("/classify_batch", multi)):
                for c in args.concurrency:
                    asyncio.run(drive(url, path, bodies, c, 2, 200))  # warm-up
                    row = {"variant": name, **asyncio.run(drive(url, path, bodies, c, args.seconds,
                                                                args.max_requests))}
                    report["runs"].append(row)
                    print(json.dumps(row), flush=True)
        finally:
            if proc:
                stop_server(proc)
    print("\n| variant | endpoint | concurrency | requests/s | images/s | vs ceiling | p50 ms | p95 ms | p99 ms | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["runs"]:
        share = r["images_per_s"] / report["ceiling_images_per_s"]
        print(f"| {r['variant']} | {r['path']} | {r['concurrency']} | {r['requests_per_s']} | {r['images_per_s']} "
              f"| {share:.2f} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['failures']} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
