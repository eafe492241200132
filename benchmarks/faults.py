"""Faults under load, loopback only, bounded in time: a worker killed mid-load, and overload.

    python benchmarks/faults.py [--kill] [--overload] [--concurrency 16] [--seconds 60]
        [--overload-concurrency 16 256] [--env KEY=VALUE ...] [--json OUT.json]

Starts ``python -m service.serve --port P --host 127.0.0.1`` itself (see benchmarks/soak.py) and
drives ``POST /classify`` with the soak's 480x320 JPEG.

``--kill``: ``--concurrency`` connections for ``--seconds``; at a third of the run the API worker
(the largest process under the server) gets SIGKILL. Reported: the throughput before the kill,
the failed requests (and their reasons), the seconds from the kill until a 3-second window is back
at 90 % of that throughput, and the new worker's pid.

``--overload``: one fresh server; for each ``--overload-concurrency`` level, ``--seconds`` of load.
Reported per level: requests/s, the share of 200s and 503s, how many 503s carried Retry-After,
the 503s' median latency (fast refusals are milliseconds), the 200s' p50/p99 in the first and the
last third of the run (a growing queue shows as a rising p99) and other failures.

Exit 0 when the runs completed (results are measurements, not verdicts), 2 when the server did
not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import (drive, multipart, parse_env, percentile, soak_jpeg, start_server,  # noqa: E402
                  stop_server, worker_pid)


def completions_per_second(record: list[tuple[float, float, str, str]], start: float) -> dict[int, int]:
    """200 responses per second of completion time, relative to ``start``."""
    out: dict[int, int] = {}
    for began, latency, outcome, _ in record:
        if outcome == "200":
            second = int(began + latency - start)
            out[second] = out.get(second, 0) + 1
    return out


def kill_run(concurrency: int, seconds: float, env: dict[str, str]) -> dict[str, Any]:
    proc, url, log_path = start_server(env)
    body = multipart([("image", soak_jpeg())], {})
    record: list[tuple[float, float, str, str]] = []
    kill_at = seconds / 3
    killed: dict[str, Any] = {}

    async def killer(start: float) -> None:
        await asyncio.sleep(kill_at)
        pid = worker_pid(proc.pid)
        killed["pid"], killed["at"] = pid, time.monotonic() - start
        if pid:
            os.kill(pid, signal.SIGKILL)

    async def run() -> float:
        start = time.monotonic()
        await asyncio.gather(drive(url + "/classify", body, concurrency, seconds, record), killer(start))
        return start

    try:
        start = asyncio.run(run())
        killed["new_pid"] = worker_pid(proc.pid)
        alive = proc.poll() is None
    finally:
        stop_server(proc)
    per_second = completions_per_second(record, start)
    baseline_seconds = range(3, int(kill_at))
    baseline = sum(per_second.get(s, 0) for s in baseline_seconds) / max(1, len(baseline_seconds))
    recovered = next((s for s in range(int(killed["at"]), int(seconds) - 2)
                      if sum(per_second.get(s + k, 0) for k in range(3)) / 3 >= 0.9 * baseline), None)
    failures: dict[str, int] = {}
    for began, _, outcome, _ in record:
        if outcome != "200":
            failures[outcome] = failures.get(outcome, 0) + 1
    return {
        "concurrency": concurrency, "seconds": seconds, "requests": len(record),
        "throughput_before_kill_per_s": round(baseline, 1), "killed_pid": killed.get("pid"),
        "new_worker_pid": killed.get("new_pid"), "kill_at_s": round(killed["at"], 1),
        "failed": sum(failures.values()), "failures": failures,
        "seconds_to_full_throughput": None if recovered is None else round(recovered - killed["at"], 1),
        "server_alive_after": alive, "per_second": [per_second.get(s, 0) for s in range(int(seconds) + 1)],
        "server_log": str(log_path),
    }


def overload_run(levels: list[int], seconds: float, env: dict[str, str]) -> list[dict[str, Any]]:
    proc, url, log_path = start_server(env)
    body = multipart([("image", soak_jpeg())], {})
    rows = []
    try:
        for concurrency in levels:
            record: list[tuple[float, float, str, str]] = []
            start = time.monotonic()
            asyncio.run(drive(url + "/classify", body, concurrency, seconds, record))
            third = seconds / 3
            ok_first = [lat for began, lat, o, _ in record if o == "200" and began - start < third]
            ok_last = [lat for began, lat, o, _ in record if o == "200" and began - start >= 2 * third]
            refused = [(lat, retry) for _, lat, o, retry in record if o.startswith("503")]
            outcomes: dict[str, int] = {}
            for _, _, outcome, _ in record:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            total = max(1, len(record))
            rows.append({
                "concurrency": concurrency, "requests": len(record), "requests_per_s": round(len(record) / seconds, 1),
                "ok_per_s": round(outcomes.get("200", 0) / seconds, 1), "outcomes": outcomes,
                "share_200": round(outcomes.get("200", 0) / total, 3), "share_503": round(len(refused) / total, 3),
                "503_with_retry_after": sum(1 for _, retry in refused if retry),
                "503_p50_ms": round(percentile([lat for lat, _ in refused], 50) * 1000, 1),
                "ok_p50_ms_first_third": round(percentile(ok_first, 50) * 1000, 1),
                "ok_p99_ms_first_third": round(percentile(ok_first, 99) * 1000, 1),
                "ok_p50_ms_last_third": round(percentile(ok_last, 50) * 1000, 1),
                "ok_p99_ms_last_third": round(percentile(ok_last, 99) * 1000, 1),
            })
            print(f"overload: {rows[-1]}", flush=True)
        alive = proc.poll() is None
    finally:
        stop_server(proc)
    for row in rows:
        row["server_alive_after"] = alive
        row["server_log"] = str(log_path)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--overload", action="store_true")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--overload-concurrency", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.seconds > 900 or max([args.concurrency, *args.overload_concurrency]) > 2048:
        raise SystemExit("bounded runs only: --seconds <= 900, concurrency <= 2048")
    if not (args.kill or args.overload):
        args.kill = args.overload = True
    env = parse_env(args.env)
    result: dict[str, Any] = {"env": env, "load_average_before": os.getloadavg(), "cores": os.cpu_count()}
    if args.kill:
        result["kill"] = kill_run(args.concurrency, args.seconds, env)
        k = result["kill"]
        print(f"kill: {k['failed']} of {k['requests']} requests failed {k['failures']}; throughput before "
              f"{k['throughput_before_kill_per_s']}/s, back to 90 % after {k['seconds_to_full_throughput']} s "
              f"(worker {k['killed_pid']} -> {k['new_worker_pid']})", flush=True)
    if args.overload:
        result["overload"] = overload_run(args.overload_concurrency, args.seconds, env)
    result["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
