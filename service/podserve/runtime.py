"""Everything one worker serves with: models, the inference pool, batchers, admission control."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from podserve import lifecycle, repository_fingerprint
from podserve.batcher import Batcher, BatchObserver, InferenceOutcome, QueueBudget
from podserve.client_disconnect import ClientConnection
from podserve.cpu_quota import cpu_limit, default_workers, intra_op_threads
from podserve.db.services import DatabaseServices
from podserve.errors import BadRequest, ModelNotReady
from podserve.inference_pool import InferencePool
from podserve.model_repository import ModelRepository, load_repository
from podserve.onnx_model import OnnxModel, ThreadBudget
from podserve.processors import Tensors
from podserve.settings import Settings

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger(__name__)

RUNTIME_SCOPE_KEY = "podserve.runtime"  # put in every request's scope by app.py's middleware


def resolve_workers(settings: Settings) -> int:
    """PODSERVE_WORKERS, then WEB_CONCURRENCY, then the cgroup CPU quota."""
    if settings.workers:
        return settings.workers
    env = os.environ.get("WEB_CONCURRENCY", "")
    return int(env) if env.isascii() and env.isdigit() and int(env) > 0 else default_workers()


def thread_budget(
    settings: Settings, workers: int | None = None, cpus: int | None = None
) -> ThreadBudget:
    """workers x pool threads x intra-op threads never exceeds the quota (unless overridden).
    `cpus`: the quota rounded up, as the default worker count is."""
    intra = settings.ort_intra_op_threads or intra_op_threads(
        workers or resolve_workers(settings),
        settings.pool_threads,
        cpus or math.ceil(cpu_limit()),
    )
    return ThreadBudget(intra, settings.ort_inter_op_threads, settings.ort_allow_spinning)


def thread_oversubscription(settings: Settings, workers: int) -> dict[str, int] | None:
    """The thread counts when workers x pool threads x intra-op threads exceed the quota's
    CPUs (rounded up, as the default worker count and split are: the defaults never do)."""
    cpus = math.ceil(cpu_limit())
    intra = thread_budget(settings, workers, cpus).intra_op
    threads = workers * settings.pool_threads * intra
    if threads <= cpus:
        return None
    return {
        "workers": workers,
        "pool_threads": settings.pool_threads,
        "intra_op_threads": intra,
        "threads": threads,
        "cpus": cpus,
    }


class ServingRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository: ModelRepository | None = None
        self.pool = InferencePool(
            settings.pool_threads,
            settings.inference_thread_nice,
            settings.inference_thread_idle,
            settings.thread_slice_us,
        )
        self.batchers: dict[tuple[str, str], Batcher] = {}
        # The budget shares the queue between models while it serves several: it counts them
        # in this dict, so whatever adds or removes a batcher changes its rule too.
        self.budget = QueueBudget(settings.max_queue_rows, settings.retry_after_s, self.batchers)
        self.batch_observers: list[BatchObserver] = []
        self.loaded = False
        self.db = DatabaseServices(settings, self)  # PostgreSQL features; inert without a URL

    async def start(self) -> None:
        # ORT writes its own log to stderr as coloured plain text, not JSON: a line per unused
        # initializer at load and per failed run (a client's bad shape too). Off by default.
        ort.set_default_logger_severity(self.settings.ort_log_severity)
        threads = thread_budget(self.settings)
        started = time.perf_counter()
        self.repository = await self.pool.run_apart(self._load_repository, threads)
        for model in self.repository.all_versions():
            batcher = Batcher(model, self.pool, self.budget, self.batch_observers)
            batcher.start()
            self.batchers[(model.name, model.version)] = batcher
        await self.db.start()
        self.loaded = True
        log.info(
            "models ready",
            extra={
                "models": sorted(self.repository.models),
                "intra_op_threads": threads.intra_op,
                "pool_threads": self.settings.pool_threads,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )

    def _load_repository(self, threads: ThreadBudget) -> ModelRepository:
        """Blocking (a thread of its own): the models, as the pod started with them."""
        root = self.settings.model_repository
        repository = load_repository(root, self.settings, threads)
        repository_fingerprint.check_unchanged(root)
        return repository

    async def stop(self) -> None:
        self.loaded = False
        await self.db.stop_background()  # jobs requeued, prediction log flushed (or spooled)
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))
        await asyncio.to_thread(self.pool.shutdown)
        await self.db.close()

    @property
    def ready(self) -> bool:
        return self.loaded and not lifecycle.is_draining()

    def served(self) -> ModelRepository:
        """The loaded repository; 503 while the models are still loading."""
        if self.repository is None:
            raise ModelNotReady("models are still loading", self.settings.retry_after_s)
        return self.repository

    def model(self, name: str, version: str | None = None) -> OnnxModel:
        return self.served().get(name, version)

    def deadline(
        self, started: float, header: str | None, body_timeout_ms: float | None = None
    ) -> float | None:
        """Absolute perf_counter deadline from the request header or the default setting, or
        from the body's own timeout (V2's `timeout` parameter) when that is sooner."""
        timeout_ms = self.settings.request_timeout_ms
        if header:
            try:
                timeout_ms = float(header)
            except ValueError:
                raise BadRequest(
                    f"X-Podserve-Timeout-Ms must be a number, got {header!r}"
                ) from None
            if not math.isfinite(timeout_ms) or timeout_ms <= 0:
                raise BadRequest("X-Podserve-Timeout-Ms must be a positive number")
        if body_timeout_ms is not None and (timeout_ms <= 0 or body_timeout_ms < timeout_ms):
            timeout_ms = body_timeout_ms
        return started + timeout_ms / 1000 if timeout_ms > 0 else None

    async def infer(
        self,
        model: OnnxModel,
        inputs: Tensors,
        rows: int,
        deadline: float | None,
        context: Any = None,
        client: ClientConnection | None = None,
    ) -> InferenceOutcome:
        batcher = self.batchers[(model.name, model.version)]
        return await batcher.submit(inputs, rows, deadline, context, client)

    @property
    def queued_rows(self) -> int:
        return self.budget.queued_rows


def runtime_of(request: Request) -> ServingRuntime:
    """From the scope: `request.app.state.runtime` is an attribute chain on every call."""
    runtime = request.scope.get(RUNTIME_SCOPE_KEY)
    return runtime if runtime is not None else request.app.state.runtime
