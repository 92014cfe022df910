"""The inference endpoints served straight from the middleware stack, past FastAPI's router.

Per request, FastAPI's routing (every route's regex in turn), dependency solving and its
exception and exit-stack layers cost about as much CPU as the whole tabular inference
(measured in-process: ~180 of ~500 us per request). The inference endpoints take only the
Request and their path parameters, so they can be called directly: this middleware, inside
every other (but QuietStartupFailure, which HTTP requests only pass through), matches POSTs
to those routes with the routes' own compiled patterns and runs the endpoint with the app's
own exception handlers. Everything else, and every other
method on those paths, goes through FastAPI as before; the routes stay registered there,
so OpenAPI, tracing's route names and the metrics' route label are unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


class DirectRoutes:
    def __init__(self, app: ASGIApp, fastapi_app: FastAPI, routes: list[APIRoute]) -> None:
        self.app = app
        self.fastapi_app = fastapi_app  # for its exception handlers
        # Only POST routes whose endpoint is `async def endpoint(request, **path_params)`.
        self.routes = [route for route in routes if "POST" in route.methods]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path = scope["path"]
            for route in self.routes:
                match = route.path_regex.match(path)
                if match is not None:
                    await self._serve(route, match.groupdict(), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, route: APIRoute, params: dict[str, Any], scope: Scope, receive: Receive, send: Send
    ) -> None:
        scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, params
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request, **params)
        except Exception as exc:
            handler = self._handler(exc)
            response = await handler(request, exc)
            if handler is self.fastapi_app.exception_handlers.get(Exception):
                # As Starlette's ServerErrorMiddleware: answer 500, then let it propagate so
                # the observability layer counts a failure and the server logs it.
                await response(scope, receive, send)
                raise
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> ExceptionHandler:
        handlers = self.fastapi_app.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                return handlers[cls]  # type: ignore[return-value]
        raise exc  # no handler at all (not the case in podserve's app): as Starlette would
