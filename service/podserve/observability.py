"""Wires metrics and tracing into the app: one ASGI middleware, GET /metrics, batch observers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from podserve.errors import NotFound
from podserve.inference_flow import CONTEXT_SCOPE_KEY, RequestContext
from podserve.loop_watch import LoopWatch
from podserve.metrics import Metrics, rejection_reason
from podserve.response_compression import CompressibleResponse
from podserve.tracing import Tracing, response_headers

if TYPE_CHECKING:
    from fastapi import FastAPI

    from podserve.batcher import BatchRecord
    from podserve.runtime import ServingRuntime
    from podserve.settings import Settings

log = logging.getLogger(__name__)

ERROR_SCOPE_KEY = "podserve.error"
METRICS_PATH = "/metrics"


def note_error(scope: Scope, exc: BaseException) -> None:
    """Called by the app's error handler: the middleware counts rejections from it.

    Only the reason is kept: the exception would hold its traceback's frames (and the
    request body) for as long as the connection keeps the scope.
    """
    scope[ERROR_SCOPE_KEY] = rejection_reason(exc)


class Observability:
    """This worker's metrics and tracing; build it in create_app (in the worker, after fork)."""

    def __init__(self, settings: Settings, runtime: ServingRuntime) -> None:
        self.runtime = runtime
        self.metrics = Metrics() if settings.metrics_enabled else None
        self.tracing = Tracing.from_settings(settings)
        self._refresher: asyncio.Task[None] | None = None
        self.routes: list[BaseRoute] = []  # set by install
        metrics = self.metrics
        self.loop_watch = LoopWatch(
            settings.loop_stall_s,
            on_lag=metrics.observe_loop_lag if metrics is not None else None,
            on_stall=metrics.count_loop_stall if metrics is not None else None,
        )

    def install(self, app: FastAPI, routes: list[BaseRoute]) -> None:
        """`routes`: the app's own, to label what is answered before routing (a 401)."""
        self.routes = routes
        if self.tracing is not None:
            self.tracing.instrument(app)
            self.runtime.batch_observers.append(self.tracing.observe_batch)
        if self.metrics is not None:
            app.add_api_route(METRICS_PATH, self._scrape, methods=["GET"], include_in_schema=False)
            self.runtime.batch_observers.append(self._observe_batch)
        if self.metrics is not None or self.tracing is not None:
            app.add_middleware(ObservabilityMiddleware, observability=self)

    async def start(self) -> None:
        """After the models are loaded (lifespan startup): loading may hold the loop."""
        self.loop_watch.start(asyncio.get_running_loop())
        if self.metrics is None:
            return
        if self.runtime.repository is not None:
            for name in self.runtime.repository.models:  # present at 0 from the start
                self.metrics.inference_errors.labels(model=name)
        self._refresher = asyncio.create_task(
            self.metrics.refresh_forever(self.runtime), name="metrics-refresh"
        )

    async def stop(self) -> None:
        self.loop_watch.stop()
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self.metrics is not None:
            # The last requests' samples outlive the worker, and so do the running totals
            # that only the refresher turned into counters: the prediction log's last write
            # (in runtime.stop, after the refresher's last pass) went uncounted, ~6-8 rows
            # per recycled worker.
            try:
                self.metrics.refresh(self.runtime)
            except Exception:  # a metrics bug must not stop the drain
                log.exception("metrics refresh failed")
                self.metrics.flush()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flush spans before the exit

    async def _scrape(self, request: Request) -> Response:
        assert self.metrics is not None
        self.metrics.flush()  # this worker's own samples are exact in its answer
        # Merging the workers' files is file I/O: keep it off the event loop.
        body, content_type = await asyncio.to_thread(
            self.metrics.render, request.headers.get("accept")
        )
        # Prometheus asks for gzip: a scrape is tens of KB of text (22 KB for 5 test models, more
        # with more models and labels), which gzip makes ~7x smaller.
        return CompressibleResponse(body, media_type=content_type)

    def _observe_batch(self, record: BatchRecord) -> None:
        assert self.metrics is not None
        result = record.result
        if result is None or record.error is not None:
            # Successful runs only, as Triton counts executions: a failed batch's rows are
            # counted again when its requests are rerun. Its span shows the error.
            return
        rows = sum(item.rows for item in record.requests)
        stages = (result.preprocess_s, result.infer_s, result.postprocess_s)  # BATCH_STAGES
        model = (record.model.name, record.model.version)
        self.metrics.observe_batch(model, rows, record.end_ns / 1e9, stages)

    def model_label(self, scope: Scope, ctx: RequestContext | None) -> tuple[str, str]:
        """The model's name and version, only for served ones (a 404's path must not create
        series); a request refused before it was validated counts for the version it named,
        or the model's default one."""
        if ctx is not None and ctx.model is not None:
            return ctx.model.name, ctx.model.version
        params = scope.get("path_params", {})
        name, repository = params.get("model_name"), self.runtime.repository
        if repository is None or name not in repository.models:
            return "", ""
        try:
            return name, repository.get(name, params.get("model_version")).version
        except NotFound:  # a version the model does not have
            return name, ""


class ObservabilityMiddleware:
    """Per request: in-flight gauge, trace-id headers; after the response: counters,
    histograms and the phase spans (off the client's critical path)."""

    def __init__(self, app: ASGIApp, observability: Observability) -> None:
        self.app = app
        self.obs = observability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.obs.metrics
        counted = metrics is not None and scope["path"] != METRICS_PATH
        span = trace.get_current_span() if self.obs.tracing is not None else None
        extra_headers = response_headers(span) if span is not None else []
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if span is not None:
                    self._annotate(scope, span)
                if extra_headers:
                    message["headers"] = [*message.get("headers", []), *extra_headers]
            await send(message)

        started = time.perf_counter()
        failed = False
        if counted:
            metrics.inflight_requests += 1  # type: ignore[union-attr]
        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            failed = True
            raise
        finally:
            if counted:
                metrics.inflight_requests -= 1  # type: ignore[union-attr]
            try:
                self._after(scope, status, time.perf_counter() - started, span, failed)
            except Exception:  # a metrics or tracing bug must not turn into a failed request
                log.exception("recording metrics/spans of a request failed")

    def _annotate(self, scope: Scope, span: Any) -> None:
        ctx: RequestContext | None = scope.get(CONTEXT_SCOPE_KEY)
        if ctx is not None and self.obs.tracing is not None:
            self.obs.tracing.annotate(span, ctx)

    def _after(self, scope: Scope, status: int, seconds: float, span: Any, failed: bool) -> None:
        ctx: RequestContext | None = scope.get(CONTEXT_SCOPE_KEY)
        if self.obs.tracing is not None and ctx is not None and span is not None:
            self.obs.tracing.record_phases(span, ctx)
        if log.isEnabledFor(logging.DEBUG):  # log_verbose_level >= 1 (POST /v2/logging)
            _log_request(scope, status, seconds, ctx, span)
        metrics = self.obs.metrics
        if metrics is None:
            return
        if status in _ANSWERED_BEFORE_ROUTING and "route" not in scope:
            _find_route(scope, self.obs.routes)
        model = self.obs.model_label(scope, ctx)
        route = getattr(scope.get("route"), "path", None) or _unrouted(scope)
        trace_id = _sampled_trace_id(span)
        metrics.observe_request(model, route, status, seconds, trace_id)
        reason = scope.get(ERROR_SCOPE_KEY)
        if reason is not None:
            metrics.count_rejection(reason)
        if ctx is None:
            return
        # Every phase its Server-Timing showed, whether or not the request got as far as a
        # valid input (a 504 or 404 in `features`, a 400 in `parse`), under the request's
        # own model label: a slow database's 504s show in the `features` histogram.
        if ctx.timings.durations:
            metrics.observe_phases(model, ctx.timings.durations, trace_id)
        if ctx.model is not None and failed and ctx.outcome is None:
            metrics.count_inference_error(model[0])  # an unhandled error out of inference


def _unrouted(scope: Scope) -> str:
    """The route label of a request no route answered: OPTIONS (options_requests.py, which
    answers it before routing) apart from the paths nothing serves."""
    return "options" if scope.get("method") == "OPTIONS" else "unmatched"


_ANSWERED_BEFORE_ROUTING = frozenset({401, 403})  # authentication answers before the router


def _find_route(scope: Scope, routes: list[BaseRoute]) -> None:
    """The route and path parameters of a request answered before routing, as the router
    would have set them: its 401 counts for its route and model, not as "unmatched" (the
    label of unknown paths)."""
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is Match.FULL:
            scope.update(child_scope)
            return


def _log_request(
    scope: Scope, status: int, seconds: float, ctx: RequestContext | None, span: Any
) -> None:
    """One DEBUG line per request, with each phase's time: where a request's time went, in
    the pod's own logs (no tracing backend needed)."""
    fields: dict[str, Any] = {
        "method": scope.get("method"), "path": scope.get("path"), "status": status,
        "ms": round(seconds * 1000, 3),
    }  # fmt: skip
    if ctx is not None:
        fields["phases_ms"] = {p: round(s * 1000, 3) for p, s in ctx.timings.durations.items()}
        if ctx.model is not None:
            fields.update(model=ctx.model.name, version=ctx.model.version, rows=ctx.rows)
        if ctx.outcome is not None:
            fields["batch_rows"] = ctx.outcome.batch_rows
    trace_id = _sampled_trace_id(span)
    if trace_id is not None:
        fields["trace_id"] = trace_id
    log.debug("request", extra=fields)


def _sampled_trace_id(span: Any) -> str | None:
    """Exemplars point at traces that were kept, or at nothing."""
    if span is None:
        return None
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid and ctx.trace_flags.sampled else None
