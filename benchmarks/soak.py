"""Soak the service: a bounded, loopback-only run at a fixed concurrency, watching errors, latency
and the worker's memory over time.

    python benchmarks/soak.py [--duration 600] [--concurrency 32] [--model cifar10] [--warmup 60]
        [--prelude] [--env KEY=VALUE ...] [--json OUT.json]

Starts ``python -m service.serve --port P --host 127.0.0.1`` itself (shipped models, its own
BENTOML_HOME; ``--env`` adds server environment variables, e.g. ``MALLOC_ARENA_MAX=2``), drives
``POST /classify`` with one 480x320 JPEG (the size of the issue's soak image, made from a CIFAR-10
photo, 17 KB) from ``--concurrency`` connections for ``--duration`` seconds, samples the RSS of every
process of the server's tree every ``--sample`` seconds, then stops the server and itself.

``--prelude`` first sends, one kind at a time, what made the worker grow in the issue, and prints
the largest process's RSS after each: 10 x /classify_batch of 64 JPEGs, 3 x the 40000x1 PNG to
catsdogs, 3 x a 24-megapixel PNG, 3 x a 12-megapixel JPEG.

Reports (Markdown on stdout, JSON with ``--json``): requests, failures by reason, p50/p99 per
minute, worker RSS at start, after the warm-up and at the end, and the growth after the warm-up
in percent (the promise: under 5 %). Exit 0 when the run completed (failures are reported, not
fatal), 2 when the server did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import BOUNDARY, multipart_body, stop_server  # noqa: E402  (one server starter, one encoder)
from serve_bench import start_server as start_bench_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CIFAR_ARCHIVE = Path(os.environ.get("IMGCLF_DATASETS", REPO.parent / "shared" / "datasets")) / "cifar10-jpeg.tar.gz"


# --- inputs --------------------------------------------------------------------------------------

def encode(image: Any, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def cifar_photo(index: int = 0) -> Any:
    """A CIFAR-10 test photo streamed from the archive (synthetic when it is absent)."""
    from PIL import Image

    if CIFAR_ARCHIVE.exists():
        with tarfile.open(CIFAR_ARCHIVE, "r|gz") as archive:
            seen = 0
            for member in archive:
                if member.isfile() and member.name.endswith(".jpg"):
                    if seen == index:
                        return Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
                    seen += 1
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32))


def soak_jpeg() -> bytes:
    """480x320 JPEG of a real photo (a CIFAR-10 one, upscaled), 17 KB."""
    from PIL import Image

    return encode(cifar_photo(3).resize((480, 320), Image.Resampling.BICUBIC), "JPEG", quality=90)


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str]) -> bytes:
    return multipart_body(files, fields)


HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


# --- the server ----------------------------------------------------------------------------------

def start_server(env: dict[str, str], timeout_s: float = 300) -> tuple[subprocess.Popen, str, Path]:
    """``python -m service.serve`` on a free loopback port (serve_bench's): (process, url, log path)."""
    started = start_bench_server(env, timeout_s, log_prefix="imgclf-soak")
    if started is None:
        raise SystemExit(2)
    return started


def tree_rss(pid: int) -> dict[int, int]:
    """RSS in bytes of the process and all its descendants."""
    import psutil

    out = {}
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                out[proc.pid] = proc.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def worker_pid(pid: int) -> int | None:
    """The API worker: the largest process of the server's tree other than the root (the models
    run in it on CPU hosts, IMGCLF_ENGINE=auto)."""
    rss = {p: r for p, r in tree_rss(pid).items() if p != pid}
    return max(rss, key=rss.get) if rss else None


def worker_rss(pid: int) -> int:
    rss = {p: r for p, r in tree_rss(pid).items() if p != pid}
    return max(rss.values()) if rss else 0


# --- load ----------------------------------------------------------------------------------------

def error_code(payload: bytes) -> str:
    """The ``error`` of a ``{"error", "detail"}`` body, or ``?``."""
    try:
        return str(json.loads(payload).get("error", "?"))
    except (ValueError, AttributeError):
        return "?"


async def drive(url: str, body: bytes, concurrency: int, seconds: float,
                record: list[tuple[float, float, str, str]]) -> None:
    """Closed loop: ``concurrency`` connections each POSTing ``body`` back to back for ``seconds``.
    Appends (start time, latency s, outcome, Retry-After) per request; outcome "200", the status and
    error code ("503 overloaded") or the client-side exception's name."""
    import aiohttp

    stop_at = time.monotonic() + seconds

    async def one_connection(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            began = time.monotonic()
            retry_after = ""
            try:
                async with session.post(url, data=body, headers=HEADERS) as response:
                    payload = await response.read()
                    outcome = str(response.status)
                    retry_after = response.headers.get("Retry-After", "")
                    if response.status != 200:
                        outcome += " " + error_code(payload)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                outcome = type(exc).__name__
                await asyncio.sleep(0.05)  # a refused connection returns at once: do not spin
            record.append((began, time.monotonic() - began, outcome, retry_after))

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one_connection(session) for _ in range(concurrency)))


async def sample_memory(pid: int, seconds: float, every: float, samples: list[tuple[float, int, int]]) -> None:
    """(time, worker RSS, whole tree RSS) every ``every`` seconds."""
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        rss = tree_rss(pid)
        workers = [r for p, r in rss.items() if p != pid]
        samples.append((time.monotonic(), max(workers) if workers else 0, sum(rss.values())))
        await asyncio.sleep(every)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def per_window(record: list[tuple[float, float, str, str]], start: float, window: float) -> list[dict[str, Any]]:
    """Requests, failures, p50 and p99 (ms) of the 200s, per ``window`` seconds."""
    rows: dict[int, list] = {}
    for began, latency, outcome, _ in record:
        rows.setdefault(int((began - start) // window), []).append((latency, outcome))
    out = []
    for index in sorted(rows):
        ok = [lat for lat, outcome in rows[index] if outcome == "200"]
        out.append({"window": index, "requests": len(rows[index]), "failed": len(rows[index]) - len(ok),
                    "p50_ms": round(percentile(ok, 50) * 1000, 1), "p99_ms": round(percentile(ok, 99) * 1000, 1)})
    return out


# --- prelude: what makes the worker grow ---------------------------------------------------------

def prelude_steps() -> list[tuple[str, str, bytes, int]]:
    """(name, path, body, repeats) for each kind of request the issue saw the worker grow after."""
    from PIL import Image

    photos = [encode(cifar_photo(i), "JPEG") for i in range(64)]
    texture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    return [
        ("classify_batch 64 JPEGs", "/classify_batch", multipart([("images", p) for p in photos], {}), 10),
        ("classify_batch 64 JPEGs to catsdogs", "/classify_batch",
         multipart([("images", p) for p in photos], {"model": "catsdogs"}), 10),
        ("40000x1 PNG to catsdogs", "/classify",
         multipart([("image", encode(Image.new("L", (40_000, 1)), "PNG"))], {"model": "catsdogs"}), 3),
        ("24-Mpx PNG (solid)", "/classify", multipart([("image", encode(Image.new("RGB", (6000, 4000), (9, 99, 199)), "PNG"))], {}), 3),
        ("12-Mpx JPEG (noise)", "/classify", multipart([("image", encode(texture.resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=70))], {}), 3),
    ]


def run_prelude(url: str, pid: int) -> list[dict[str, Any]]:
    import httpx

    rows = []
    with httpx.Client(timeout=120) as client:
        for name, path, body, repeats in prelude_steps():
            before = worker_rss(pid)
            statuses = [client.post(url + path, content=body, headers=HEADERS).status_code for _ in range(repeats)]
            time.sleep(1)
            rows.append({"step": name, "bytes": len(body), "statuses": sorted(set(statuses)),
                         "rss_before_mb": round(before / 2**20), "rss_after_mb": round(worker_rss(pid) / 2**20)})
            print(f"prelude: {name}: {rows[-1]}", flush=True)
    return rows


# --- main ----------------------------------------------------------------------------------------

def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", default="cifar10")
    parser.add_argument("--warmup", type=float, default=60, help="seconds before the RSS reference point")
    parser.add_argument("--window", type=float, default=60, help="seconds per latency row")
    parser.add_argument("--sample", type=float, default=5, help="seconds between RSS samples")
    parser.add_argument("--prelude", action="store_true")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.duration > 3600 or args.concurrency > 1024:
        raise SystemExit("bounded runs only: --duration <= 3600, --concurrency <= 1024")

    env = parse_env(args.env)
    proc, url, log_path = start_server(env)
    result: dict[str, Any] = {"duration_s": args.duration, "concurrency": args.concurrency, "model": args.model,
                              "env": env, "host": f"{platform.node()} {os.cpu_count()} cores",
                              "load_average_before": os.getloadavg()}
    try:
        result["rss_start_mb"] = round(worker_rss(proc.pid) / 2**20)
        if args.prelude:
            result["prelude"] = run_prelude(url, proc.pid)
        body = multipart([("image", soak_jpeg())], {"model": args.model})
        record: list[tuple[float, float, str, str]] = []
        samples: list[tuple[float, int, int]] = []
        start = time.monotonic()

        async def both() -> None:
            await asyncio.gather(drive(url + "/classify", body, args.concurrency, args.duration, record),
                                 sample_memory(proc.pid, args.duration, args.sample, samples))

        asyncio.run(both())
        result["load_average_after"] = os.getloadavg()
        result["server_alive"] = proc.poll() is None
    finally:
        stop_server(proc)

    outcomes: dict[str, int] = {}
    for _, _, outcome, _ in record:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    after_warmup = [s for s in samples if s[0] - start >= args.warmup] or samples[-1:]
    reference, end = after_warmup[0][1], samples[-1][1]
    result.update({
        "requests": len(record), "outcomes": outcomes, "failed": len(record) - outcomes.get("200", 0),
        "requests_per_s": round(len(record) / args.duration, 1),
        "p99_ms": round(percentile([lat for _, lat, o, _ in record if o == "200"], 99) * 1000, 1),
        "per_window": per_window(record, start, args.window),
        "rss_after_warmup_mb": round(reference / 2**20), "rss_end_mb": round(end / 2**20),
        "rss_max_mb": round(max(s[1] for s in samples) / 2**20),
        "rss_growth_after_warmup_pct": round((end - reference) / reference * 100, 2) if reference else None,
        "rss_samples_mb": [(round(t - start), round(w / 2**20)) for t, w, _ in samples],
        "server_log": str(log_path),
    })
    print(f"\nsoak: {args.duration:.0f} s at concurrency {args.concurrency}, model {args.model}, env {env}")
    print(f"requests {result['requests']} ({result['requests_per_s']}/s), failed {result['failed']} {outcomes}")
    print("| minute | requests | failed | p50 ms | p99 ms |\n| --- | --- | --- | --- | --- |")
    for row in result["per_window"]:
        print(f"| {row['window']} | {row['requests']} | {row['failed']} | {row['p50_ms']} | {row['p99_ms']} |")
    print(f"worker RSS: start {result['rss_start_mb']} MB, after warm-up {result['rss_after_warmup_mb']} MB, "
          f"end {result['rss_end_mb']} MB, max {result['rss_max_mb']} MB; growth after warm-up "
          f"{result['rss_growth_after_warmup_pct']} %")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
