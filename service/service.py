"""The BentoML services. ``bentoml serve service.service:ImageClassifier`` (or ``python -m service.serve``).

* ``ImageClassifier``, the entry point: BentoML runs its workers (``IMGCLF_API_WORKERS``; ``auto``,
  the default, uses the host's cores: see :func:`service.config.api_workers`) and serves ``/livez``, ``/readyz``, ``/metrics``; the API itself is the Starlette
  app of :mod:`service.app`, mounted with BentoML's public ``@bentoml.asgi_app``.
* where the models run (``IMGCLF_ENGINE``; ``auto``: ``service`` when CUDA is usable, else
  ``inprocess``), see :mod:`service.engine`: each API worker batches its requests and runs a batch
  with one call, either on its own copy of the models (``inprocess``) or as one call per batch to
  ``InferenceEngine``, a one-worker service that owns the GPU (``service``).

Start-up, in order: ``check_registry`` (a BentoML deployment hook, once, in ``bentoml serve``'s
own process before any worker starts) reads the settings and hashes every served artifact; a bad
registry ends start-up there with one line and exit code 2. Then each worker's ``__init__`` reads
the settings again, loads the cards (the hashes are not recomputed) and the models.

Read when BentoML loads this module (it needs them to build the service graph): the worker count,
the request timeout, the access log switch and the engine layout (:func:`service.config.bentoml_options`).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import sys
from typing import Any

import aiohttp
import bentoml
import numpy as np

from service.app import Api, ApiHolder, LineFeedPaths, build_app
from service.config import Settings, api_workers, bentoml_options
from service.engine import Batcher, Explainer, LocalRunner, RemoteRunner, run_models, warm_up
from service.logs import configure_logging
from service.registry import LoadedModel, RegistryError, gpu_backend_usable, load_cards, load_registry
from service.schemas import openapi_document

logger = logging.getLogger("imgclf.service")

BATCH_SIZE = bentoml.metrics.Histogram(
    name="imgclf_model_batch_size",
    documentation="Images per model call (adaptive batching at work)",
    labelnames=["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
IMAGES = bentoml.metrics.Counter(
    name="imgclf_images_total", documentation="Images classified", labelnames=["model"])
REJECTED = bentoml.metrics.Counter(
    name="imgclf_rejected_total", documentation="Requests answered with a 4xx or 503", labelnames=["error"])
REQUESTS = bentoml.metrics.Counter(
    name="imgclf_requests_total", documentation="Requests answered, by endpoint and status",
    labelnames=["endpoint", "status"])
ENGINE_CALLS = bentoml.metrics.Counter(
    name="imgclf_engine_calls_total",
    documentation="Calls received by the inference-engine service (one per batch of an API worker)",
    labelnames=["model"])


def observe_batch(model: str, size: int) -> None:
    BATCH_SIZE.labels(model=model).observe(size)
    IMAGES.labels(model=model).inc(size)


def engine_layout(engine: str, device: str, backend: str) -> str:
    """``IMGCLF_ENGINE``; ``auto``: the engine service where the backend can run on a GPU here."""
    if engine != "auto":
        return engine
    return "service" if device != "cpu" and gpu_backend_usable(backend) else "inprocess"


def load_models(settings: Settings, layout: str, threads: int) -> dict[str, LoadedModel]:
    models = load_registry(settings.models_dir, settings.backend, settings.device,
                           list(settings.models) or None, threads)
    for name, model in models.items():
        logger.info("model ready: model=%s version=%s backend=%s device=%s engine=%s", name,
                    model.version, model.backend_name, model.backend.device, layout)
        if layout == "service" and model.backend.device != "cuda":
            logger.warning("model %s runs on the %s in the engine service: the GPU layout without a GPU "
                           "(set IMGCLF_ENGINE=inprocess, or check the backend's CUDA libraries)",
                           name, model.backend.device)
    return models


_OPTIONS = bentoml_options()  # what BentoML's decorators need (see module doc)
LAYOUT = engine_layout(_OPTIONS["engine"], _OPTIONS["device"], _OPTIONS["backend"])
# The processes BentoML starts from this one inherit the decision (and skip the CUDA probe, which
# imports torch: once per start, not once per worker).
os.environ["IMGCLF_ENGINE"] = LAYOUT
WORKERS = api_workers(LAYOUT)
HOLDER = ApiHolder()
app = build_app(HOLDER)


@bentoml.service(
    name="inference-engine",
    workers=1,
    traffic={"timeout": _OPTIONS["timeout_s"] + 1},
    logging={"access": {"enabled": False}},
    # BentoML's client to this service closes its whole connection pool every max_requests calls
    # (default 100) or max_age seconds, failing the calls in flight on it under concurrency.
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
)
class InferenceEngine:
    """Owns the GPU; receives one call per batch of an API worker, never one per request."""

    def __init__(self) -> None:
        settings = Settings.from_env()
        configure_logging(settings.log_format, settings.log_level)
        self.models = load_models(settings, "service", settings.engine_threads)
        warm_up(self.models)

    @bentoml.api
    def predict(self, model: str, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) uint8 images for ``model`` -> (N, classes) float32 probabilities."""
        ENGINE_CALLS.labels(model=model).inc()
        return run_models(self.models, {model: pixels}, observe_batch)[model]


@bentoml.service(
    name="image-classifier",
    workers=WORKERS,
    traffic={"timeout": _OPTIONS["timeout_s"] + 1},  # our own 408/503 answer first
    logging={"access": {"enabled": _OPTIONS["access_log"]}},
    # OpenTelemetry spans for every request cost ~12 % of a worker's CPU (profile in
    # docs/SERVING.md); the classify routes are traced only with IMGCLF_TRACING=1.
    **({} if _OPTIONS["tracing"] else {"tracing": {"excluded_urls": ["/classify", "/classify_batch", "/explain"]}}),
)
@bentoml.asgi_app(app, path="/")
class ImageClassifier:
    if LAYOUT == "service":
        engine = bentoml.depends(InferenceEngine)

    @bentoml.on_deployment
    def check_registry() -> None:
        """Once per start, before any worker: every served artifact hashed against its card."""
        settings = Settings.from_env()
        try:
            cards = load_cards(settings.models_dir, settings.models, settings.backend)
            load_cards_default(settings, cards)
        except RegistryError as exc:
            print(f"imgclf: cannot start: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def __init__(self) -> None:
        settings = Settings.from_env()
        configure_logging(settings.log_format, settings.log_level)
        cards = load_cards(settings.models_dir, settings.models, settings.backend)
        default = load_cards_default(settings, cards)
        layout = engine_layout(settings.engine, settings.device, settings.backend)
        if layout == "service":
            runner: Any = RemoteRunner(self._engine_call, settings.max_pixels)
            logger.info("models run in the inference-engine service (engine=service)")
        else:
            models = load_models(settings, layout, settings.threads_per_worker(api_workers(layout)))
            runner = LocalRunner(models, settings.max_pixels, observe_batch)
        batcher = Batcher(runner, settings.max_batch_size, settings.max_latency_ms, settings.max_queue,
                          settings.batching, in_flight=settings.in_flight(layout),
                          max_queue_bytes=settings.max_queue_bytes)
        HOLDER.api = Api(settings, cards, default, batcher,
                         on_reject=lambda error: REJECTED.labels(error=error).inc(),
                         on_answer=lambda endpoint, status: REQUESTS.labels(endpoint=endpoint,
                                                                            status=str(status)).inc(),
                         openapi=_openapi_bytes(cards, default),
                         # without torch (the CPU image) /explain answers 501 not_explainable
                         explainer=Explainer(settings.models_dir, cards, settings.max_pixels)
                         if importlib.util.find_spec("torch") else None)
        # Everything loaded so far lives as long as the worker: move it out of the collector's
        # way, so the periodic full collections that requests trigger stay short.
        gc.collect()
        gc.freeze()

    async def _engine_call(self, model: str, pixels: np.ndarray) -> np.ndarray:
        """One batch to the engine; inference is idempotent, so a dropped connection is retried."""
        for attempt in range(3):
            try:
                return await self.engine.to_async.predict(model=model, pixels=pixels)
            except aiohttp.ClientConnectionError:
                if attempt == 2:
                    raise
                logger.warning("engine connection dropped; retrying (%d)", attempt + 1)
        raise AssertionError("unreachable")


# a path with a line feed reaches the API app (BentoML's mount cannot route it; see LineFeedPaths)
ImageClassifier.add_asgi_middleware(LineFeedPaths, api_app=app)


def load_cards_default(settings: Settings, cards: dict[str, dict[str, Any]]) -> str:
    default = settings.resolve_default_model(cards)
    if default not in cards:
        raise RegistryError(f"default model {default!r} is not among {sorted(cards)} (set IMGCLF_DEFAULT_MODEL)")
    return default


def _openapi_bytes(cards: dict[str, dict[str, Any]], default: str) -> bytes:
    import json

    return json.dumps(openapi_document(sorted(cards), default)).encode()
