"""The layout's promises (docs/ARCHITECTURE.md), checked on the code itself: importing the service
does no work, no module is too long to read, and no import circle or ``global`` state exists."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "training")
MAX_LINES = 450


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_importing_the_service_reads_no_setting_and_loads_no_framework() -> None:
    """With every setting invalid, ``import service.service`` still succeeds (no setting is read
    at import), loads neither PyTorch nor ONNX Runtime, and changes no environment variable."""
    poisoned = {name: "not-a-valid-value" for name in (
        "IMGCLF_TIMEOUT_S", "IMGCLF_ENGINE", "IMGCLF_DEVICE", "IMGCLF_BACKEND", "IMGCLF_API_WORKERS",
        "IMGCLF_ACCESS_LOG", "IMGCLF_TRACING", "IMGCLF_BENTOML_METRICS", "IMGCLF_MAX_PIXELS", "IMGCLF_LOG_FORMAT")}
    poisoned["IMGCLF_MODELS_DIR"] = "/nonexistent"
    code = ("import os, sys, json; before = dict(os.environ); import service.service as s; "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'onnxruntime': 'onnxruntime' in sys.modules, "
            "'environ_changed': dict(os.environ) != before, 'args': s.ARGS.model_dump()}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **poisoned})
    assert result.returncode == 0, result.stderr[-2000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == {"torch": False, "onnxruntime": False, "environ_changed": False,
                     "args": {"layout": "inprocess", "workers": 1, "timeout_s": 30, "access_log": False,
                              "tracing": False, "bentoml_metrics": False}}


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_the_line_limit(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by idea (docs/ARCHITECTURE.md)"


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (anywhere in the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def test_no_import_circle() -> None:
    known = modules()
    graph = {name: imports_of(name, path, set(known)) for name, path in known.items()}
    circles = []

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            circles.append(trail[trail.index(name):] + [name])
            return
        for target in graph.get(name, ()):
            visit(target, trail + [name])

    for name in graph:
        visit(name, [])
    assert not circles, f"import circles: {sorted({' -> '.join(c) for c in circles})}"


def test_no_global_statement_in_the_service() -> None:
    """Module-level state that functions rewrite (``global``) has no place in service/: state lives
    in the objects a worker makes at start-up."""
    offenders = [f"{path.relative_to(REPO)}:{node.lineno}" for path in sorted((REPO / "service").rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Global)]
    assert not offenders, offenders
