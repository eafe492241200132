"""Load generator for the service: requests/s, p50/p95/p99 and the server's CPU per request.

Interface (benchmarks/gpu_run.py calls it as a subprocess; keep it stable):

    python benchmarks/serve_bench.py --start --models-dir DIR [--model cifar10] \\
        [--concurrency 32 128] [--duration 10] [--load-procs N] [--batch-files 32] [--json OUT.json]
    python benchmarks/serve_bench.py --url http://127.0.0.1:3000 [--server-pid PID] [same options]

``--start`` runs ``python -m service.serve`` (this interpreter) on a free loopback port with that
registry; the environment passes through, so ``IMGCLF_DEVICE``, ``IMGCLF_BACKEND``,
``IMGCLF_ENGINE``, ``IMGCLF_API_WORKERS``... apply. ``--variants`` starts one server per named
variant in turn (env overrides in ``VARIANTS``). ``--url`` measures a running server instead
(loopback only); ``--server-pid`` then gives the process whose tree's CPU time is measured.

Per server, at each concurrency: ``POST /classify`` (one real CIFAR-10 JPEG per request, the
``--model`` model), ``POST /classify_batch`` (``--batch-files`` JPEGs per request), and
``GET /livez``, a no-op, to show the load generator's own ceiling on this host. Each measurement
runs ``--duration`` seconds after a short warm-up, from ``--load-procs`` processes (default: a
quarter of the cores, at least one) each holding its share of the connections. Reported per run:
requests and images per second, p50/p95/p99 latency, failures by reason, and the server's CPU
milliseconds per request (user + system time of every process of the server's tree, from
psutil, over the measurement). The server is stopped afterwards. Results: a Markdown table on
stdout and JSON in ``--json``. Exit code 0, or 2 if the server did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "inprocess": {"IMGCLF_ENGINE": "inprocess"},
    "inprocess-1worker": {"IMGCLF_ENGINE": "inprocess", "IMGCLF_API_WORKERS": "1"},
    "inprocess-unbatched": {"IMGCLF_ENGINE": "inprocess", "IMGCLF_BATCHING": "0"},
    "service": {"IMGCLF_ENGINE": "service"},
    "service-1worker": {"IMGCLF_ENGINE": "service", "IMGCLF_API_WORKERS": "1"},
}
BOUNDARY = "benchb0undary7MA4YWxkTrZu0gW"


def sample_jpegs(count: int) -> list[bytes]:
    """Real CIFAR-10 test JPEGs when the archive is here, else synthetic 32x32 JPEGs."""
    try:
        from training.data import extract_archive, shared_datasets_dir

        folder = extract_archive(shared_datasets_dir() / "cifar10-jpeg.tar.gz") / "cifar10-jpeg" / "test"
        files = sorted(folder.glob("*/*.jpg"))[:: max(1, 10_000 // count)][:count]
        if files:
            return [f.read_bytes() for f in files]
    except (FileNotFoundError, ImportError):
        pass
    from PIL import Image

    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.effect_noise((32, 32), 40 + i % 50).convert("RGB").save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


def multipart_body(files: list[tuple[str, bytes]], fields: dict[str, str]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for field, data in files:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="x.jpg"\r\n'
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    address = socket.gethostbyname(host)
    if not ipaddress.ip_address(address).is_loopback:
        raise SystemExit(f"refusing to load-test {host} ({address}): loopback targets only")


async def _drive(url: str, method: str, bodies: list[bytes], connections: int, seconds: float,
                 images_per_request: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    why: dict[str, int] = {}
    stop_at = time.perf_counter() + seconds
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    sent = 0

    async def worker(session: aiohttp.ClientSession, offset: int) -> None:
        nonlocal sent
        # open the connections a little apart: BentoML's workers share one listening socket, and
        # a burst of connects is accepted by whichever worker wakes first
        await asyncio.sleep(offset * 0.003)
        i = offset
        while time.perf_counter() < stop_at:
            body = bodies[i % len(bodies)] if bodies else b""
            i += connections
            began = time.perf_counter()
            try:
                if method == "GET":
                    context = session.get(url)
                else:
                    context = session.post(url, data=body, headers=headers)
                async with context as response:
                    await response.read()
                    reason = "" if response.status == 200 else str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                reason = type(exc).__name__
            sent += 1
            if reason:
                why[reason] = why.get(reason, 0) + 1
            else:
                latencies.append(time.perf_counter() - began)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session, k) for k in range(connections)))
        elapsed = time.perf_counter() - began
    return {"latencies": latencies, "why": why, "elapsed": elapsed, "images": len(latencies) * images_per_request}


def _drive_process(args: tuple) -> dict[str, Any]:
    return asyncio.run(_drive(*args))


def server_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of the process ``pid`` and all its descendants (0 when unknown)."""
    if pid is None:
        return 0.0
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(pool: Any, procs: int, url: str, path: str, method: str, bodies: list[bytes], concurrency: int,
            seconds: float, images_per_request: int, server_pid: int | None) -> dict[str, Any]:
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    jobs = [(url + path, method, bodies[k::procs] or bodies, share, seconds, images_per_request)
            for k, share in enumerate(shares)]
    warm = [(u, m, b, s, min(2.0, max(0.5, seconds / 5)), n) for u, m, b, s, _, n in jobs]
    pool.map(_drive_process, warm)
    cpu_before = server_cpu_seconds(server_pid)
    parts = pool.map(_drive_process, jobs)
    cpu = server_cpu_seconds(server_pid) - cpu_before
    latencies = np.array([x for p in parts for x in p["latencies"]]) * 1000
    elapsed = max(p["elapsed"] for p in parts)
    why: dict[str, int] = {}
    for p in parts:
        for k, v in p["why"].items():
            why[k] = why.get(k, 0) + v
    requests = len(latencies)
    pct = (lambda q: round(float(np.percentile(latencies, q)), 1)) if requests else (lambda q: None)
    return {"path": path, "concurrency": concurrency, "load_procs": procs, "requests": requests,
            "failures": sum(why.values()), "failure_reasons": why, "seconds": round(elapsed, 2),
            "requests_per_s": round(requests / elapsed, 1), "images": sum(p["images"] for p in parts),
            "images_per_s": round(sum(p["images"] for p in parts) / elapsed, 1),
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "server_cpu_ms_per_request": (round(cpu * 1000 / requests, 2) if server_pid and requests else None)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env: dict[str, str], timeout_s: float = 300, log_prefix: str = "serve_bench",
                 attempts: int = 3) -> tuple[subprocess.Popen, str, Path] | None:
    """``python -m service.serve`` on a free loopback port: (process, url, log path), or None when it
    did not become ready (the benchmarks in this folder all start their server here). A server that
    exits before it is ready (e.g. its free port was taken before it could bind) is started again
    on a new port, up to ``attempts`` times."""
    import httpx

    # its own BENTOML_HOME unless one is set: `bentoml serve` wipes $BENTOML_HOME/prometheus_multiproc_dir
    home = os.environ.get("BENTOML_HOME") or tempfile.mkdtemp(prefix="serve_bench-bentoml-")
    deadline = time.monotonic() + timeout_s
    for _ in range(attempts):
        port = free_port()
        log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"{log_prefix}-{port}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "service.serve", "--port", str(port), "--host", "127.0.0.1"],
                                cwd=REPO, env={**os.environ, "BENTOML_HOME": home, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    return proc, url, Path(log.name)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        if proc.poll() is None:  # out of time, still starting: no retry
            break
    print(f"server did not start; see {log.name}", file=sys.stderr)
    stop_server(proc)
    return None


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--start", action="store_true", help="start python -m service.serve on a free port")
    target.add_argument("--url", help="measure this running server (loopback only)")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's root process, for CPU per request")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="cifar10")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--load-procs", type=int, default=max(1, (os.cpu_count() or 1) // 4))
    parser.add_argument("--batch-files", type=int, default=32, help="JPEGs per /classify_batch request")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default"],
                        help="with --start: one server per variant, in turn")
    parser.add_argument("--paths", nargs="+", default=["/classify", "/classify_batch", "/livez"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # SIGTERM (a caller's time limit) unwinds like Ctrl-C: the server this started is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    jpegs = sample_jpegs(256)
    fields = {"model": args.model}
    bodies = {
        "/classify": ([multipart_body([("image", j)], fields) for j in jpegs], 1, "POST"),
        "/classify_batch": ([multipart_body([("images", jpegs[(i * 7 + k) % len(jpegs)]) for k in range(args.batch_files)],
                                            fields) for i in range(32)], args.batch_files, "POST"),
        "/livez": ([], 0, "GET"),
    }
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start",
        "python": platform.python_version(), "models_dir": str(args.models_dir), "model": args.model,
        "env": {k: v for k, v in os.environ.items() if k.startswith("IMGCLF_")},
        "duration_s": args.duration, "load_procs": args.load_procs, "runs": []}
    status = 0
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.load_procs) as pool:
        for variant in (["given"] if args.url else args.variants):
            proc, pid = None, args.server_pid
            if args.url:
                require_loopback(args.url)
                url = args.url
            else:
                started = start_server({**VARIANTS[variant], "IMGCLF_MODELS_DIR": str(args.models_dir)})
                if started is None:
                    status = 2
                    continue
                proc, url, _ = started
                pid = proc.pid
            try:
                for path in args.paths:
                    path_bodies, images, method = bodies[path]
                    for c in args.concurrency:
                        row = {"variant": variant, **measure(pool, args.load_procs, url, path, method, path_bodies,
                                                             c, args.duration, images, pid)}
                        report["runs"].append(row)
                        print(json.dumps(row), flush=True)
                        if args.json:  # after every measurement: a run cut short keeps what it measured
                            args.json.write_text(json.dumps(report, indent=2))
            finally:
                if proc is not None:
                    stop_server(proc)
    print("\n| variant | endpoint | concurrency | requests/s | images/s | p50 ms | p95 ms | p99 ms "
          "| server CPU ms/request | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["runs"]:
        print(f"| {r['variant']} | {r['path']} | {r['concurrency']} | {r['requests_per_s']} | {r['images_per_s']} "
              f"| {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['server_cpu_ms_per_request']} | {r['failures']} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
