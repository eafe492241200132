"""Every setting of the service, read from environment variables in this one place, at start-up.

:meth:`Settings.from_env` is called once per process when it starts (``python -m service.serve``,
each BentoML worker's ``__init__``, ``python -m service.score``), never at import. The launcher
decides what BentoML itself needs before any worker exists (the engine layout, the worker count,
the request timeout, the access log, tracing and BentoML-metrics switches: :meth:`Settings.bentoml_arguments`) and
hands it to ``bentoml serve`` as ``--arg`` values (``bentoml.use_arguments``, :mod:`service.service`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.preprocess import DEFAULT_MAX_PIXELS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024  # per API worker: 32 bodies at the default 8 MiB limit
CORES_PER_INPROCESS_WORKER = 4
BACKEND_CHOICES = ("onnx", "torchscript")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
ENGINE_CHOICES = ("auto", "inprocess", "service")


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


def _auto_int(name: str) -> int:
    """A positive integer, or ``auto`` (also the default) as 0."""
    raw = (os.environ.get(name) or "auto").strip()
    if raw == "auto":
        return 0
    value = _int(name, 0)
    if value < 1:
        raise SystemExit(f"{name}={raw!r}: expected a positive integer or 'auto'")
    return value


def host_cores() -> int:
    """CPU cores this process may run on (the affinity mask, else the machine's count): the one
    core count of the project (workers, inference threads, decode processes)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    models_dir: Path
    models: tuple[str, ...]  # empty: every model in models_dir
    default_model: str | None  # IMGCLF_DEFAULT_MODEL; None: the registry decides (load_cards)
    backend: str  # onnx | torchscript
    device: str  # auto | cpu | cuda
    engine: str  # auto | inprocess | service: where the models run (see layout())
    api_workers: int  # IMGCLF_API_WORKERS; 0: auto (see workers())
    batching: bool  # adaptive batching on (default) or every request runs alone
    max_batch_size: int
    max_latency_ms: int  # queue-wait cap: a request expected to wait longer gets 503 + Retry-After
    max_queue: int  # images waiting per API worker; more get 503 + Retry-After
    max_queue_bytes: int  # upload bytes waiting per API worker (queued or decoding); more get 503
    batches_in_flight: int  # batches a worker runs at once; 0: auto (see in_flight)
    max_body_bytes: int
    max_pixels: int
    max_files: int
    engine_threads: int  # 0: the host's cores split between the API workers
    timeout_s: int
    body_timeout_s: float  # a request body not received within this gets 408
    access_log: bool  # one log line per request; off by default (no per-request log spam)
    tracing: bool  # OpenTelemetry spans for the classify routes too (IMGCLF_TRACING=1)
    bentoml_metrics: bool  # BentoML's own per-request HTTP metrics too (IMGCLF_BENTOML_METRICS=1)
    log_format: str  # json | text (our own log lines; BentoML keeps its format)
    log_level: str

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ.get
        timeout = _int("IMGCLF_TIMEOUT_S", 30)
        return cls(
            models_dir=Path(env("IMGCLF_MODELS_DIR") or REPO_ROOT / "models"),
            models=tuple(m for m in (env("IMGCLF_MODELS") or "").split(",") if m),
            default_model=env("IMGCLF_DEFAULT_MODEL") or None,
            backend=_choice("IMGCLF_BACKEND", "onnx", BACKEND_CHOICES),
            device=_choice("IMGCLF_DEVICE", "auto", DEVICE_CHOICES),
            engine=_choice("IMGCLF_ENGINE", "auto", ENGINE_CHOICES),
            api_workers=_auto_int("IMGCLF_API_WORKERS"),
            batching=_int("IMGCLF_BATCHING", 1) == 1,
            max_batch_size=max(2, _int("IMGCLF_MAX_BATCH_SIZE", 128)),
            max_latency_ms=max(1, _int("IMGCLF_MAX_LATENCY_MS", 2000)),
            max_queue=max(1, _int("IMGCLF_MAX_QUEUE", 4096)),
            max_queue_bytes=max(0, _int("IMGCLF_MAX_QUEUE_BYTES", DEFAULT_MAX_QUEUE_BYTES)),
            batches_in_flight=_auto_int("IMGCLF_BATCHES_IN_FLIGHT"),
            max_body_bytes=_int("IMGCLF_MAX_BODY_BYTES", 8 * 1024 * 1024),
            max_pixels=_int("IMGCLF_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            max_files=_int("IMGCLF_MAX_FILES", 64),
            engine_threads=_int("IMGCLF_ENGINE_THREADS", 0),
            timeout_s=timeout,
            body_timeout_s=float(_int("IMGCLF_BODY_TIMEOUT_S", timeout)),
            access_log=_int("IMGCLF_ACCESS_LOG", 0) == 1,
            tracing=_int("IMGCLF_TRACING", 0) == 1,
            bentoml_metrics=_int("IMGCLF_BENTOML_METRICS", 0) == 1,
            log_format=_choice("IMGCLF_LOG_FORMAT", "json", ("json", "text")),
            log_level=_choice("IMGCLF_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        )

    def layout(self) -> str:
        """Where the models run, decided here only: ``IMGCLF_ENGINE``; ``auto`` (default): the engine
        service (``service``, one process owns the GPU) where the backend can run on a GPU here,
        else in each API worker (``inprocess``). The probe asks the CUDA driver, not a framework."""
        if self.engine != "auto":
            return self.engine
        from service.backends import gpu_backend_usable

        return "service" if self.device != "cpu" and gpu_backend_usable(self.backend) else "inprocess"

    def workers(self, layout: str) -> int:
        """API workers: ``IMGCLF_API_WORKERS``, or ``auto`` (default), which uses the host's cores:
        with the engine service (GPU hosts) one API worker per core, since the workers only parse and
        decode; with the models in the API workers (``inprocess``, CPU hosts) one worker per
        ``CORES_PER_INPROCESS_WORKER`` cores, each running the models on its share of the cores
        (measured on 2 cores: one worker with 2 inference threads beats two with one, docs/SERVING.md)."""
        if self.api_workers:
            return self.api_workers
        cores = host_cores()
        return cores if layout == "service" else max(1, cores // CORES_PER_INPROCESS_WORKER)

    def in_flight(self, layout: str) -> int:
        """Batches a worker runs at once (``IMGCLF_BATCHES_IN_FLIGHT``; ``auto``, the default: 2 with
        the engine service, where a batch's decoding in the worker overlaps the previous batch's
        engine call; 1 with the models in the worker, where one batch gets all of the worker's
        inference threads and the batches grow larger. Measured side by side on 2 cores,
        docs/BENCHMARKS.md: a CIFAR ResNet-18 serves 1.13x the requests/s with 1 than with 2,
        the shipped ResNet-20 the same within noise, at less CPU a request)."""
        if self.batches_in_flight:
            return self.batches_in_flight
        return 2 if layout == "service" else 1

    def threads_per_worker(self, workers: int) -> int:
        """Inference threads per model call in an API worker (``IMGCLF_ENGINE_THREADS``, else the
        cores split between the workers). Measured on 2 cores with one batch in flight (the
        in-process default): 2 threads serve both the shipped ResNet-20 and a ResNet-18 best
        (docs/BENCHMARKS.md)."""
        return self.engine_threads or max(1, host_cores() // workers)

    def bentoml_arguments(self, layout: str) -> dict[str, Any]:
        """What ``bentoml serve`` needs before any worker exists, as its ``--arg`` values
        (:class:`service.service.ServeArgs` reads them with ``bentoml.use_arguments``)."""
        return {"layout": layout, "workers": self.workers(layout), "timeout_s": self.timeout_s,
                "access_log": self.access_log, "tracing": self.tracing, "bentoml_metrics": self.bentoml_metrics}
