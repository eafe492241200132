"""Where a serving worker's CPU goes under load: a timeline of its threads and batches.

Starts ``python -m service.serve`` (one API worker, the models in it: the CPU layout) on a registry
(default: the peers' light registry, so the figures are the server's, not the network's), drives
it with ``wrk`` (closed loop, ``--concurrency`` connections posting one JPEG each to ``/classify``)
and samples, every ``--every`` seconds:

* the CPU time of each thread of the worker (``/proc/PID/task/TID/stat``): the event loop (the
  worker's main thread: HTTP, multipart, batching, answers, metrics) and the others (the thread
  that decodes and runs each batch, and ONNX Runtime's pool);
* the worker's ``/metrics``: batches run and images classified in the interval, so the batch size
  over time (``imgclf_model_batch_size``) and the throughput.

Prints one line per interval and a summary (CPU ms a request per thread, mean batch size); with
``--json`` writes both. Needs ``wrk`` (``apt-get install wrk``) and a JPEG (``--image``).

    python benchmarks/serve_timeline.py --image sample.jpg --seconds 10 --json docs/benchmarks/serve_timeline_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BOUNDARY = "wrkboundary7MA4YWxkTrZu0gW"
POST_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%s"
local f = io.open("%s", "rb"); wrk.body = f:read("*a"); f:close()
"""


def multipart_body(image: Path, out: Path) -> None:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    out.write_bytes(head + image.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode())


def thread_ticks(pid: int) -> dict[int, int]:
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        ticks[int(task.name)] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks


def metric_sum(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def scrape(url: str) -> tuple[float, float]:
    """(batches run, images classified) so far."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return metric_sum(text, "imgclf_model_batch_size_count"), metric_sum(text, "imgclf_images_total")


def worker_pid(root: int) -> int:
    for _ in range(100):
        out = subprocess.run(["pgrep", "-f", "_bentoml_impl.worker.service.*image-classifier"],
                             capture_output=True, text=True).stdout.split()
        if out:
            return int(out[0])
        time.sleep(0.2)
    raise SystemExit("no API worker found")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="the JPEG every request posts")
    parser.add_argument("--models-dir", type=Path, default=REPO.parent / "shared" / "peers" / "registry")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--every", type=float, default=0.5, help="sampling interval (s)")
    parser.add_argument("--port", type=int, default=8197)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    url = f"http://127.0.0.1:{args.port}"
    work = Path(tempfile.mkdtemp(prefix="serve-timeline-"))
    multipart_body(args.image, work / "body.bin")
    (work / "post.lua").write_text(POST_LUA % (BOUNDARY, work / "body.bin"))
    env = {**os.environ, "IMGCLF_MODELS_DIR": str(args.models_dir), "BENTOML_HOME": str(work / "bentoml")}
    server = subprocess.Popen([sys.executable, "-m", "service.serve", "--port", str(args.port), "--host", "127.0.0.1"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(180):
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        pid = worker_pid(server.pid)
        wrk = ["wrk", "-t1", f"-c{args.concurrency}", "--latency", "-s", str(work / "post.lua"), url + "/classify"]
        subprocess.run([*wrk[:3], "-d3s", *wrk[3:]], capture_output=True, check=True)  # warm up
        load = subprocess.Popen([*wrk[:3], f"-d{args.seconds:g}s", *wrk[3:]], stdout=subprocess.PIPE, text=True)
        rows = []
        ticks, (batches, images), then = thread_ticks(pid), scrape(url), time.monotonic()
        first, start = dict(ticks), then
        while load.poll() is None:
            time.sleep(args.every)
            now_ticks, (now_batches, now_images), now = thread_ticks(pid), scrape(url), time.monotonic()
            dt = now - then
            busy = {tid: (now_ticks[tid] - ticks.get(tid, 0)) / CLK_TCK / dt for tid in now_ticks}
            loop = busy.get(pid, 0.0)
            rows.append({"t": round(now - start, 2),
                         "images_per_s": round((now_images - images) / dt),
                         "mean_batch": round((now_images - images) / max(1.0, now_batches - batches), 1),
                         "event_loop_cores": round(loop, 2),
                         "other_threads_cores": round(sum(busy.values()) - loop, 2)})
            ticks, batches, images, then = now_ticks, now_batches, now_images, now
        out = load.stdout.read() if load.stdout else ""
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    last = ticks
    total_images = sum(r["images_per_s"] for r in rows) * args.every or 1
    per_thread = sorted(((tid, (last[tid] - first.get(tid, 0)) / CLK_TCK * 1000 / total_images) for tid in last),
                        key=lambda item: -item[1])
    summary = {
        "wrk": {key: found.group(1) for key, found in (
            ("requests_per_s", re.search(r"Requests/sec:\s+(\S+)", out)),
            ("p50", re.search(r"^\s+50%\s+(\S+)", out, re.M)),
            ("p99", re.search(r"^\s+99%\s+(\S+)", out, re.M))) if found},
        "cpu_ms_per_request": {("event loop (main thread)" if tid == pid else f"thread {tid}"): round(ms, 3)
                               for tid, ms in per_thread if ms >= 0.005},
        "mean_batch": round(sum(r["images_per_s"] for r in rows) / max(1e-9, sum(
            r["images_per_s"] / r["mean_batch"] for r in rows if r["mean_batch"])), 1),
        "concurrency": args.concurrency, "models_dir": str(args.models_dir),
    }
    for row in rows:
        print(f"t={row['t']:5.1f}s  {row['images_per_s']:5d} img/s  batch {row['mean_batch']:5.1f}  "
              f"event loop {row['event_loop_cores']:.2f} core  other threads {row['other_threads_cores']:.2f} core")
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "timeline": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
