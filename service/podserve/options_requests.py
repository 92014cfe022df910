"""OPTIONS answered with the methods a path takes (RFC 9110 9.3.7), not routing's 405.

An OPTIONS request asks which methods a resource supports: 204 with `Allow` listing them
(HEAD wherever GET is, as head_requests.py answers it, and OPTIONS itself), or routing's 404
where no route has the path. A middleware inside authentication (a catch-all OPTIONS route
made every unknown path a 405): authentication applies as to any method (podserve sends no
CORS headers, so a browser's key-less preflight would gain nothing from an exemption, and
the routes' methods are no more public than /docs, which needs a key too). The metrics
count it under route="options", not the route asked about.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from fastapi import FastAPI
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

# The order in which `Allow` lists the methods a path takes.
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_PARAMETER = re.compile(r"{[^}]*}")  # a path parameter in a route's template


class OptionsAnswer:
    """Answers OPTIONS on a path some route has; any other request, and OPTIONS on a path
    no route has (routing's 404), goes on to the app."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app  # its routes, read per request: /metrics comes later

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            allowed = _allowed_methods(self.fastapi_app.router.routes, scope)
            if allowed is not None:
                # Not under the route asked about (observability labels it route="options"):
                # counted with the infer route's requests, preflights and probes would dilute
                # its per-phase averages, which divide by that route's request count.
                answer = Response(status_code=204, headers={"Allow": ", ".join(allowed)})
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The app's routes, those of its included routers too: FastAPI >= 0.16x keeps an
    included router whole (its `original_router`; podserve includes them without a prefix)
    where older versions copied its routes into the app's list."""
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            yield from _leaf_routes(nested.routes)
        else:
            yield route


def _allowed_methods(routes: list[BaseRoute], scope: Scope) -> list[str] | None:
    """The methods of the most specific routes that have the request's path (None: no route
    has it). Most specific: the most literal characters in the path template, as a
    path that two templates match is served (`/v1/models/m:predict`: POST by predict, GET
    refused by the model-status route; `/v2/models/stats`: the statistics, not a model)."""
    methods: set[str] = set()
    best = -1
    for route in _leaf_routes(routes):
        path = getattr(route, "path", None)
        route_methods = getattr(route, "methods", None)
        if path is None or not route_methods:
            continue
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        literal = len(_PARAMETER.sub("", path))
        if literal > best:
            methods, best = set(), literal
        if literal == best:
            methods |= set(route_methods)
    if not methods:
        return None
    if "GET" in methods:
        methods.add("HEAD")  # head_requests.HeadAsGet answers HEAD on every GET route
    methods.add("OPTIONS")
    ordered = [m for m in _METHOD_ORDER if m in methods]
    return ordered + sorted(methods.difference(_METHOD_ORDER))
