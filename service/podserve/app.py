"""The FastAPI application: lifespan (load models, warm up, then ready), routes, errors."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from podserve import (
    __version__,
    batching_demotion,
    drain_grace,
    log_control,
    options_requests,
    pod_settings,
    routes_health,
    routes_jobs,
    routes_pod_settings,
    routes_repository,
    routes_statistics,
    routes_v1,
    routes_v2,
    startup_failure,
)
from podserve.auth import api_keys, install_auth
from podserve.direct_routes import DirectRoutes
from podserve.errors import PodserveError, routing_error_message
from podserve.gc_tuning import tune_collector
from podserve.head_requests import HeadAsGet
from podserve.inference_flow import error_headers
from podserve.json_response import json_response
from podserve.logs import configure_logging
from podserve.observability import Observability, note_error
from podserve.request_id import RequestIdMiddleware, response_header
from podserve.runtime import RUNTIME_SCOPE_KEY, ServingRuntime
from podserve.settings import Settings, get_settings
from podserve.time_slice import shorten_slice

log = logging.getLogger(__name__)


class RuntimeScopeMiddleware:
    """Per HTTP request: puts the worker's ServingRuntime in the scope (RUNTIME_SCOPE_KEY),
    adds the X-Podserve-Worker header when PODSERVE_EXPOSE_WORKER_ID is on, and answers 503
    for a request cancelled at the end of the drain (drain_grace.answer_cut_off)."""

    def __init__(self, app: ASGIApp, runtime: ServingRuntime, expose_worker: bool) -> None:
        self.app = app
        self.runtime = runtime
        self.worker_header = (b"x-podserve-worker", str(os.getpid()).encode())
        self.expose_worker = expose_worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.expose_worker:
            send = _add_worker_header(send, self.worker_header)
        scope[RUNTIME_SCOPE_KEY] = self.runtime
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not await drain_grace.answer_cut_off(send):
                raise
            log.warning("request cut off at the end of the drain: answered 503",
                        extra={"path": scope["path"]})  # fmt: skip


def _add_worker_header(send: Send, header: tuple[bytes, bytes]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), header]
        await send(message)

    return wrapped


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PodserveError)
    async def podserve_error(request: Request, exc: PodserveError) -> Response:
        note_error(request.scope, exc)  # counted as a rejection (shed, deadline, ...)
        headers = error_headers(request.scope, exc.headers)
        return json_response({"error": exc.message}, exc.status_code, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return json_response({"error": f"invalid request: {exc.errors()}"}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        allow = (exc.headers or {}).get("Allow")
        message = routing_error_message(
            exc.status_code, str(exc.detail), request.method, request.scope["path"], allow,
            request.app.docs_url,
        )  # fmt: skip
        return json_response({"error": message}, exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        # The error propagates after this answer, and uvicorn then closes the connection:
        # say so, or a keep-alive client sends its next request into a closed socket.
        # Starlette sends this answer outside every middleware: the request id is added here.
        headers = error_headers(request.scope, {"connection": "close", **response_header()})
        return json_response({"error": "internal server error"}, 500, headers)


def inference_routes() -> list[APIRoute]:
    """V2 infer (both paths) and V1 predict: the routes DirectRoutes serves."""
    endpoints = (routes_v2.infer, routes_v2.infer_version, routes_v1.model_predict)
    return [
        route
        for router in (routes_v2.router, routes_v1.router)
        for route in router.routes
        if isinstance(route, APIRoute) and route.endpoint in endpoints
    ]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.access_log)
    log_control.apply(log_control.from_settings(settings.log_level, settings.access_log))
    # A worker forked after a change (a recycle, a crash) logs its start-up at the pod's level.
    log_control.POD_SETTING.follow()
    keys = api_keys(settings)  # first: a broken key file stops the boot before threads start
    runtime = ServingRuntime(settings)
    observability = Observability(settings, runtime)  # in the worker: after Gunicorn's fork
    pod_follower = pod_settings.Follower()  # log/trace settings changed on another worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await runtime.start()
            batching_demotion.serve(runtime.served().all_versions())  # demoted by another worker
            await observability.start()
            pod_follower.start()
        except Exception as exc:
            if not startup_failure.is_known(exc):  # a bug: its traceback
                raise
            raise startup_failure.logged(exc, settings) from exc  # one line, not a traceback
        tune_collector(settings.gc_gen0_threshold, settings.gc_freeze)  # all loaded now
        shorten_slice(settings.thread_slice_us, "event loop")  # lifespan runs on the loop
        try:
            yield
        finally:
            # In this order, each step even if one before it fails (logged with its name): a
            # follower's failure must not skip the prediction log's flush, the jobs' requeue
            # or the pool's close. Observability after the last batch: its spans are flushed.
            steps = (
                ("pod-settings follower", pod_follower.stop),
                ("runtime", runtime.stop),
                ("observability", observability.stop),
            )
            for step, stop in steps:
                try:
                    await stop()
                except Exception:
                    log.exception("shutdown step failed; the next ones run", extra={"step": step})

    app = FastAPI(
        title="podserve",
        version=__version__,
        description="ONNX model serving: Open Inference Protocol (V2) and KServe V1 REST.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        # Tracing is podserve's own (tracing.py, opentelemetry-instrumentation-fastapi);
        # FastAPI's native telemetry would only add a provider lookup to every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # A trailing slash is a 404, not a 307 whose Location is built from the request's
        # Host header (reflected as sent) and scheme (http:// behind a TLS ingress that is
        # not a trusted proxy): clients call the documented paths.
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    app.state.observability = observability
    _install_error_handlers(app)
    app.add_middleware(startup_failure.QuietStartupFailure)  # innermost: lifespan only
    # routes_statistics before routes_v2: /v2/models/stats is not a model named "stats".
    routers = (
        routes_health, routes_statistics, routes_v2, routes_v1, routes_repository, routes_jobs,
        routes_pod_settings,
    )  # fmt: skip
    for module in routers:
        app.include_router(module.router)
    # Inside every layer but QuietStartupFailure (which HTTP requests only pass through): the
    # inference endpoints skip FastAPI's router (see direct_routes.py).
    app.add_middleware(DirectRoutes, fastapi_app=app, routes=inference_routes())
    app.add_middleware(options_requests.OptionsAnswer, fastapi_app=app)  # inside auth
    install_auth(app, keys, settings)  # inside observability: 401s are counted and traced
    # Inside observability too: its 503 for a request cut off by the drain is what is counted.
    app.add_middleware(
        RuntimeScopeMiddleware, runtime=runtime, expose_worker=settings.expose_worker_id
    )
    observability.install(app, [route for module in routers for route in module.router.routes])
    app.add_middleware(HeadAsGet)  # outermost: every layer, metrics included, sees the GET
    app.add_middleware(RequestIdMiddleware)  # outside HeadAsGet: the access line says HEAD
    return app
