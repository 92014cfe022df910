"""Request ids: `X-Request-ID` on every answer and on every log line written for the request.

An incoming `X-Request-ID` (1 to 128 visible ASCII characters: no spaces, no control
characters) is kept; one that is missing or not like that is replaced by a new id, so a
client's bytes never reach the logs raw. A new id is 32 hex digits: 20 random per worker
process, then a 12-digit counter (no syscall, no uuid per request).

The id lives in a context variable, set once per request by the outermost of podserve's
middlewares (RequestIdMiddleware):
the JSON formatter (logs.py) reads it for every line written while the request is handled,
and AccessFields adds the request's fields to uvicorn's access line. Starlette answers an
unhandled error's 500 outside every middleware (ServerErrorMiddleware, which the
OpenTelemetry instrumentation requires outermost): that handler adds response_header().
Answers the HTTP protocol writes itself, before any app (header_guard.py's 400 / 408 / 431),
have no id.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128
_VALID = re.compile(rb"[!-~]{1,%d}" % MAX_LENGTH)


class RequestRecord:
    """What the logs need of the request in flight; `live` is cleared once it is answered, so
    a background task created while it was handled (it inherits the context) does not log
    the id for ever after."""

    __slots__ = ("id", "live", "response", "scope", "started")

    def __init__(self, request_id: bytes, scope: Scope) -> None:
        self.id = request_id
        self.scope = scope
        self.started = time.perf_counter()
        self.response: Message | None = None  # its http.response.start, once sent
        self.live = True


_current: ContextVar[RequestRecord | None] = ContextVar("podserve_request", default=None)


def current_request_id() -> str | None:
    """The id of the request this code runs for, or None outside a request."""
    request = _current.get()
    return request.id.decode("ascii") if request is not None and request.live else None


def response_header() -> dict[str, str]:
    """X-Request-ID for an answer sent outside RequestIdMiddleware (the 500 handler)."""
    request = _current.get()
    return {"x-request-id": request.id.decode("ascii")} if request is not None else {}


# --- new ids --------------------------------------------------------------------------------
def _seed() -> None:
    """A worker forked from the master must not repeat the master's (or a sibling's) ids."""
    global _prefix, _counter
    _prefix = os.urandom(10).hex().encode()
    _counter = itertools.count(1)


_prefix: bytes
_counter: itertools.count[int]
_seed()
os.register_at_fork(after_in_child=_seed)


def new_request_id() -> bytes:
    return b"%s%012x" % (_prefix, next(_counter))


def request_id_of(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-ID if it is acceptable, else a new one."""
    for name, value in headers:
        if name == HEADER:
            return value if _VALID.fullmatch(value) else new_request_id()
    return new_request_id()


# --- the ASGI layer -------------------------------------------------------------------------
class RequestIdMiddleware:
    """Outermost: sets the request's id for its logs and adds X-Request-ID to its answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = RequestRecord(request_id_of(scope["headers"]), scope)
        _current.set(request)  # this request's own task: nothing to reset for the next one
        header = (HEADER, request.id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # A copy: a cached response's header list must not grow with every answer.
                message["headers"] = [*message.get("headers", ()), header]
                request.response = message
            await send(message)

        await self.app(scope, receive, send_with_id)
        # Not on an error: uvicorn's "Exception in ASGI application" line still carries it.
        request.live = False


# --- the access line ------------------------------------------------------------------------
class AccessFields(logging.Filter):
    """On uvicorn's access logger (only called when the access log is on): adds the request's
    method, path, status, model, client, duration_ms (until its answer's headers are sent:
    podserve writes its answers whole) and bytes (the answer's Content-Length) as fields;
    logs.py's formatter adds request_id and, when tracing, the trace and span ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = _current.get()
        if request is not None:
            record.__dict__.update(_access_fields(request))
            if "status" not in record.__dict__ and isinstance(record.args, tuple):
                record.status = record.args[-1]  # a 500 sent past the middleware: uvicorn's
        return True


def _access_fields(request: RequestRecord) -> dict[str, Any]:
    scope = request.scope
    fields: dict[str, Any] = {
        "method": scope.get("method"),
        "path": scope.get("path"),
        "duration_ms": round((time.perf_counter() - request.started) * 1000, 3),
    }
    if request.response is not None:
        fields["status"] = request.response["status"]
        length = _content_length(request.response.get("headers", ()))
        if length is not None:
            fields["bytes"] = length
    client = scope.get("client")
    if client:
        fields["client"] = f"{client[0]}:{client[1]}"
    params = scope.get("path_params") or {}
    if "model_name" in params:  # a route that names a model (served or not: a 404's too)
        fields["model"] = params["model_name"]
        if params.get("model_version"):
            fields["model_version"] = params["model_version"]
    return fields


def _content_length(headers: Any) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None
