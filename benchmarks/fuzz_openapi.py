"""Schemathesis against the service's own OpenAPI document: requests generated from the document,
every answer checked against it.

    python benchmarks/fuzz_openapi.py                      # starts its own server (loopback), 500 cases an operation and mode
    python benchmarks/fuzz_openapi.py --url http://127.0.0.1:3000 --examples 2000 --json out.json

Checks (schemathesis' own): no 5xx; every status, body and content type declared for its path.
Left out on purpose: "positive data acceptance" (a schema-valid upload of random bytes is rightly
refused with 400 ``not_an_image``: JSON Schema cannot say "a decodable image"). Bounded in count
(``--examples`` per operation and mode) and time (each request's timeout); ``tests/test_openapi.py`` runs
the same loop with 40 cases an operation and mode. Exit status 1 when a check fails (hypothesis prints the
smallest failing request).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

REPO = Path(__file__).resolve().parents[1]
UPLOADS = ("POST /classify", "POST /classify_batch", "POST /explain")


def documented_501(label: str, response: Any) -> bool:
    """``POST /explain`` for a model whose registry entry has no Grad-CAM graph (``cifar10-int8``, ONNX
    only) answers the documented 501 ``not_explainable``: a declared answer, not a server error."""
    if response.status_code != 501 or label != "POST /explain":
        return False
    try:
        return response.json().get("error") == "not_explainable"
    except ValueError:  # not JSON: a real server error
        return False


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' ``not_a_server_error``, less :func:`documented_501`."""
    if documented_501(case.operation.label, response):
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(url: str, examples: int) -> dict[str, Any]:
    """Run ``examples`` generated requests per operation of ``url``'s document and per generation
    mode (positive: what the document allows; negative: what it forbids, e.g. a missing file or a
    ``top_k`` that is no integer), derandomized, so a rerun sends the same requests; a failed check
    raises. Returns statuses per operation and mode and, per upload endpoint, how many requests were
    refused (a 4xx, or a file refused in its ``/classify_batch`` slot)."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    statuses: dict[str, collections.Counter] = {}
    refused: collections.Counter = collections.Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    for mode, operation in itertools.product(GenerationMode, operations):
        label = operation.label

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            response = case.call(base_url=url, timeout=60)
            case.validate_response(response, checks=CHECKS)
            status = "501 not_explainable" if documented_501(label, response) else response.status_code
            statuses.setdefault(f"{label} ({mode.value})", collections.Counter())[status] += 1
            if response.status_code >= 400 or (
                    label == "POST /classify_batch" and any("error" in r for r in response.json()["results"])):
                refused[label] += 1

        try:
            call()
        except Unsatisfiable:  # nothing the document forbids for this operation (GET /models: no inputs)
            if mode is GenerationMode.POSITIVE:
                raise
    cases = sum(sum(c.values()) for c in statuses.values())
    return {"cases": cases,
            "server_errors": sum(n for c in statuses.values() for s, n in c.items() if isinstance(s, int) and s >= 500),
            "statuses": {label: dict(sorted(c.items(), key=str)) for label, c in sorted(statuses.items())},
            "refused": dict(refused)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one on loopback)")
    parser.add_argument("--examples", type=int, default=500, help="generated requests per operation")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from serve_bench import start_server, stop_server

    started = None if args.url else start_server({"IMGCLF_MODELS_DIR": str(REPO / "models")},
                                                 log_prefix="fuzz_openapi")
    if not args.url and started is None:
        return 2
    url = args.url or started[1]
    start = time.monotonic()
    try:
        summary = fuzz(url, args.examples)
    except Exception as exc:  # a failed check: hypothesis has printed the request
        print(f"check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if started is not None:
            stop_server(started[0])
    summary["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if summary["server_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
