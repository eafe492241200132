"""Start the service: check the registry and the port first, then hand over to ``bentoml serve``.

    python -m service.serve [--port 3000] [--host 0.0.0.0] [extra bentoml serve options]

The port is ``--port``, else ``IMGCLF_PORT``, else 3000. A missing or corrupted artifact (sha256
differs from its card), a bad default model or a port already in use ends start-up here with a
one-line reason and exit code 2, before BentoML starts. The artifacts hashed here are not hashed
again by the server (``service.registry.record_verified``). The engine layout is decided here, once
(:meth:`service.config.Settings.layout`), and handed to BentoML with the worker count, the timeout
and the logging switches as ``--arg`` values (:class:`service.service.ServeArgs`).

BentoML is started as ``sys.executable -m bentoml``: the same interpreter and packages as this
process, wherever they are installed (a venv, ``pip --user``/``--target``, ``PYTHONPATH``).
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from service.config import Settings
from service.card import RegistryError
from service.registry import load_cards


def option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served (None: it can), tried the way the server will bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (set IMGCLF_PORT or --port)"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def fail(reason: str) -> None:
    print(f"imgclf: cannot start: {reason}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str]) -> None:
    settings = Settings.from_env()
    try:
        cards, default = load_cards(settings.models_dir, settings.models, settings.backend, settings.default_model)
    except RegistryError as exc:
        fail(str(exc))
    port_text = option(argv, "--port") or os.environ.get("IMGCLF_PORT") or "3000"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        fail(f"port {port_text!r} is not a TCP port number")
    host = option(argv, "--host") or "0.0.0.0"
    if (problem := port_problem(host, int(port_text))) is not None:
        fail(problem)
    if option(argv, "--port") is None:
        argv = ["--port", port_text, *argv]
    layout = settings.layout()
    arguments = [f"--arg={key}={value}" for key, value in settings.bentoml_arguments(layout).items()]
    served = ", ".join(f"{name} v{card.version}" for name, card in cards.items())
    print(f"imgclf: serving {served} (default {default}) from {settings.models_dir} "
          f"({settings.backend}, device {settings.device}, engine {layout}) on port {port_text}",
          file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "bentoml", "serve", "service.service:ImageClassifier",
                              *arguments, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
