"""Reading request bodies safely: size checked before reading, slow drips cut off."""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from podserve.deadline_sweep import sweep_for
from podserve.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from podserve.request_headers import request_headers

JSON_TYPES = ("application/json", "application/octet-stream")


def check_content_type(request: Request) -> None:
    """JSON, or octet-stream for the binary extension; a missing type is taken as JSON."""
    headers = request_headers(request.scope)
    content_type = headers.get("content-type", "")
    if content_type not in JSON_TYPES:  # the exact common values skip the parsing below
        content_type = content_type.split(";")[0].strip().lower()
        if content_type and content_type not in JSON_TYPES and not content_type.endswith("+json"):
            raise UnsupportedMediaType(f"content type {content_type!r} is not supported; send JSON")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"content encoding {encoding!r} is not supported")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or 413 past `max_bytes`, or 408 if it is not in within `timeout_s`
    (checked by a sweep, not a timer per request: see deadline_sweep.py)."""
    declared = request_headers(request.scope).get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length must be a non-negative integer")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks: list[bytes] = []
    total = 0
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    receive = request.receive  # the ASGI messages themselves: no stream generator per request
    sweep = sweep_for(asyncio.get_running_loop(), timeout_s)
    sweep.arm(task, expire)
    try:
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                raise BadRequest("client disconnected while sending the body")
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:  # our deadline, and nobody else's cancel
            raise RequestTimeout(f"request body not received within {timeout_s:g} s") from None
        raise
    finally:
        sweep.disarm(task)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def binary_header_length(request: Request) -> int | None:
    value = request_headers(request.scope).get("inference-header-content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
    return int(value)
