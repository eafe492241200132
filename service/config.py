"""Every setting of the service, read from environment variables in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = os.environ.get(name) or default
    if raw not in allowed:
        raise SystemExit(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
    return raw


@dataclass(frozen=True)
class Settings:
    models_dir: Path
    models: tuple[str, ...]  # empty: every model in models_dir
    default_model: str
    backend: str  # onnx | torchscript
    device: str  # auto | cpu | cuda
    engine: str  # auto | inprocess | service: where the models run (see service/service.py)
    batching: bool  # adaptive batching on (default) or every request runs alone
    max_batch_size: int
    max_latency_ms: int
    max_body_bytes: int
    max_pixels: int
    max_files: int
    api_workers: int
    engine_threads: int  # 0: the runtime's default (all cores)
    timeout_s: int
    access_log: bool  # one log line per request; off by default (no per-request log spam)
    log_format: str  # json | text (our own log lines; BentoML keeps its format)
    log_level: str

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        return cls(
            models_dir=Path(env("IMGCLF_MODELS_DIR") or REPO_ROOT / "models"),
            models=tuple(m for m in (env("IMGCLF_MODELS") or "").split(",") if m),
            default_model=env("IMGCLF_DEFAULT_MODEL") or "cifar10",
            backend=_choice("IMGCLF_BACKEND", "onnx", ("onnx", "torchscript")),
            device=_choice("IMGCLF_DEVICE", "auto", ("auto", "cpu", "cuda")),
            engine=_choice("IMGCLF_ENGINE", "auto", ("auto", "inprocess", "service")),
            batching=_int("IMGCLF_BATCHING", 1) == 1,
            max_batch_size=max(2, _int("IMGCLF_MAX_BATCH_SIZE", 128)),
            max_latency_ms=_int("IMGCLF_MAX_LATENCY_MS", 5000),
            max_body_bytes=_int("IMGCLF_MAX_BODY_BYTES", 8 * 1024 * 1024),
            max_pixels=_int("IMGCLF_MAX_PIXELS", 40_000_000),
            max_files=_int("IMGCLF_MAX_FILES", 64),
            api_workers=_int("IMGCLF_API_WORKERS", 1),
            engine_threads=_int("IMGCLF_ENGINE_THREADS", 0),
            timeout_s=_int("IMGCLF_TIMEOUT_S", 30),
            access_log=_int("IMGCLF_ACCESS_LOG", 0) == 1,
            log_format=_choice("IMGCLF_LOG_FORMAT", "json", ("json", "text")),
            log_level=_choice("IMGCLF_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        )
