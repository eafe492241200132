"""The BentoML services: ``python -m service.serve`` (which checks the registry and the port, then runs
``bentoml serve service.service:ImageClassifier`` with the ``--arg`` values below).

* ``ImageClassifier``, the entry point: BentoML runs its workers and serves ``/livez``, ``/readyz``,
  ``/metrics``; the API itself is the Starlette app of :mod:`service.app`, mounted with BentoML's
  public ``@bentoml.asgi_app``. Each request reaches its worker's service object through
  ``bentoml.get_current_service()``; nothing is kept in this module.
* where the models run (``layout``): ``inprocess``, each API worker batches its requests and runs a
  batch on its own copy of the models (:class:`~service.runners.LocalRunner`); ``service``, one call
  per batch to ``InferenceEngine``, a one-worker service that owns the GPU
  (:class:`~service.runners.RemoteRunner`).

What BentoML needs before any service object exists (the layout, which decides whether the engine
service is part of the graph; the worker count; the request timeout; the access log, tracing and
BentoML-metrics switches) comes from ``bentoml serve --arg KEY=VALUE`` through BentoML's public
``bentoml.use_arguments`` (:class:`ServeArgs`): the launcher computes them once from the settings
(:meth:`service.config.Settings.bentoml_arguments`). Importing this module reads no setting and
imports no framework beyond BentoML; a plain ``bentoml serve service.service:ImageClassifier``
serves in-process with one worker.

Start-up, in order: ``check_registry`` (a BentoML deployment hook, once, in ``bentoml serve``'s own
process before any worker starts) reads the settings and hashes every served artifact; a bad
registry ends start-up there with one line and exit code 2. Then each worker's ``__init__`` reads
the settings, loads the cards (the hashes are not recomputed) and the models.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import sys
from typing import Any, Callable, Literal

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, ConfigDict

from service.app import Api, ServiceFirst, build_app
from service.batching import Batcher
from service.card import RegistryError
from service.config import Settings
from service.explain import Explainer
from service.logs import configure_logging
from service.preprocess import DEFAULT_DECODE_BUDGET_BYTES, DecodeBudget
from service.registry import LoadedModel, load_cards, load_registry
from service.runners import LocalRunner, RemoteRunner, run_model, warm_up
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
DURATION = bentoml.metrics.Histogram(
    name="imgclf_request_duration_seconds",
    documentation="Seconds from a request's arrival to its answer, by endpoint (classify, classify_batch, explain)",
    labelnames=["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
OUT_OF_DISTRIBUTION = bentoml.metrics.Counter(
    name="imgclf_out_of_distribution_total",
    documentation="Answers whose image the model judged out of distribution (ood_score above the card's "
                  "threshold): a rising share of imgclf_images_total is an input stream drifting away from the "
                  "training data", labelnames=["model"])
ENGINE_CALLS = bentoml.metrics.Counter(
    name="imgclf_engine_calls_total",
    documentation="Calls received by the inference-engine service (one per batch of an API worker)",
    labelnames=["model"])


class RequestMetrics:
    """A worker's per-request metric updates, with each labelled child looked up once (a
    ``labels()`` call costs about as much as the update itself)."""

    def __init__(self) -> None:
        self.answered = Children(lambda key: (REQUESTS.labels(endpoint=key[0], status=str(key[1])),
                                              DURATION.labels(endpoint=key[0])))  # endpoints x statuses
        self.rejected = Children(lambda error: REJECTED.labels(error=error))
        self.out_of_distribution = Children(lambda model: OUT_OF_DISTRIBUTION.labels(model=model))

    def on_answer(self, endpoint: str, status: int, seconds: float) -> None:
        requests, duration = self.answered[endpoint, status]
        requests.inc()
        duration.observe(seconds)

    def on_reject(self, error: str) -> None:
        self.rejected[error].inc()

    def on_ood(self, model: str, answers: int) -> None:
        self.out_of_distribution[model].inc(answers)


class Children(dict[Any, Any]):
    """A metric's labelled children by their label values, each made (``make(key)``) on first use."""

    def __init__(self, make: Callable[[Any], Any]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key: Any) -> Any:
        child = self[key] = self.make(key)
        return child


def observe_batch(model: str, size: int) -> None:
    BATCH_SIZE.labels(model=model).observe(size)
    IMAGES.labels(model=model).inc(size)


class ServeArgs(BaseModel):
    """``bentoml serve --arg`` values (defaults: what a plain ``bentoml serve`` gets)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layout: Literal["inprocess", "service"] = "inprocess"
    workers: int = 1
    timeout_s: int = 30
    access_log: bool = False
    tracing: bool = False
    bentoml_metrics: bool = False


ARGS = bentoml.use_arguments(ServeArgs)


# Young-generation collection threshold of a worker (Python's default: 700). Measured side by side on
# the peers' light registry, c=32: 20,000 serves ~5 % more requests/s at ~5 % less CPU a request
# (docs/SERVING.md).
GC_YOUNG_THRESHOLD = 20_000


def current_api() -> Api | None:
    """The Api of this worker's service object (None while it is being made)."""
    try:
        return getattr(bentoml.get_current_service(), "api", None)
    except BentoMLException:  # no service object yet: the worker is starting
        return None


app = build_app(current_api)


def load_models(settings: Settings, layout: str, threads: int) -> dict[str, LoadedModel]:
    models = load_registry(settings.models_dir, settings.backend, settings.device, settings.models or None, threads)
    for name, model in models.items():
        logger.info("model ready: model=%s version=%s backend=%s device=%s engine=%s", name,
                    model.version, model.backend_name, model.backend.device, layout)
        if layout == "service" and model.backend.device != "cuda":
            logger.warning("model %s runs on the %s in the engine service: the GPU layout without a GPU "
                           "(set IMGCLF_ENGINE=inprocess, or check the backend's CUDA libraries)",
                           name, model.backend.device)
    return models


@bentoml.service(
    name="inference-engine",
    workers=1,
    traffic={"timeout": ARGS.timeout_s + 1},
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
        return run_model(self.models[model], pixels, observe_batch)


@bentoml.service(
    name="image-classifier",
    workers=ARGS.workers,
    traffic={"timeout": ARGS.timeout_s + 1},  # our own 408/503 answer first
    logging={"access": {"enabled": ARGS.access_log}},
    # BentoML's request metrics (four labelled updates a request, in a middleware outside ours) cost
    # ~5 % of requests/s on the 2-core build machine (docs/SERVING.md); the API counts and times its
    # own requests (imgclf_requests_total, imgclf_request_duration_seconds) and serves /metrics
    # itself (service.app). IMGCLF_BENTOML_METRICS=1 puts BentoML's back, with its /metrics route.
    metrics={"enabled": ARGS.bentoml_metrics},
    # OpenTelemetry spans for every request cost ~12 % of a worker's CPU (profile in
    # docs/SERVING.md); the classify routes are traced only with IMGCLF_TRACING=1.
    **({} if ARGS.tracing else {"tracing": {"excluded_urls": ["/classify", "/classify_batch", "/explain"]}}),
)
@bentoml.asgi_app(app, path="/")
class ImageClassifier:
    if ARGS.layout == "service":
        engine = bentoml.depends(InferenceEngine)

    @bentoml.on_deployment
    def check_registry() -> None:
        """Once per start, before any worker: every served artifact hashed against its card."""
        settings = Settings.from_env()
        try:
            load_cards(settings.models_dir, settings.models, settings.backend, settings.default_model)
        except RegistryError as exc:
            print(f"imgclf: cannot start: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def __init__(self) -> None:
        settings = Settings.from_env()
        configure_logging(settings.log_format, settings.log_level)
        cards, default = load_cards(settings.models_dir, settings.models, settings.backend, settings.default_model)
        budget = DecodeBudget(DEFAULT_DECODE_BUDGET_BYTES)  # every decode of this worker shares it
        in_flight = settings.in_flight(ARGS.layout)  # batches at once, one runner thread each
        if ARGS.layout == "service":
            runner: Any = RemoteRunner(self._engine_call, settings.max_pixels, budget)
            logger.info("models run in the inference-engine service (engine=service)")
        else:
            models = load_models(settings, ARGS.layout, settings.threads_per_worker(ARGS.workers))
            runner = LocalRunner(models, settings.max_pixels, budget, observe_batch, in_flight)
        batcher = Batcher(runner, settings.max_batch_size, settings.max_latency_ms, settings.max_queue,
                          settings.batching, in_flight=in_flight,
                          max_queue_bytes=settings.max_queue_bytes)
        metrics = RequestMetrics()
        self.api = Api(settings, cards, default, batcher, on_reject=metrics.on_reject, on_answer=metrics.on_answer,
                       on_ood=metrics.on_ood,
                       openapi=json.dumps(openapi_document(sorted(cards), default)).encode(),
                       # without torch (the CPU image) /explain answers 501 not_explainable
                       explainer=Explainer(settings.models_dir, cards, settings.max_pixels, budget)
                       if importlib.util.find_spec("torch") else None)
        # Everything loaded so far lives as long as the worker: move it out of the collector's
        # way, so the periodic full collections that requests trigger stay short; and collect the
        # young generation every GC_YOUNG_THRESHOLD allocations rather than Python's 700 (a request
        # allocates a few hundred objects, nearly all freed by reference counting before then).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

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


# the inference routes go straight to their endpoints, and a path with a line feed to the API app
# (BentoML's mount cannot route it): see ServiceFirst
ImageClassifier.add_asgi_middleware(ServiceFirst, api_app=app)
