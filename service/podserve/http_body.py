"""Reading request bodies safely: size checked before reading, slow drips cut off."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

from podserve.deadline_sweep import sweep_for
from podserve.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

JSON_TYPES = ("application/json", "application/octet-stream")


def check_content_type(request: Request) -> None:
    """JSON, or octet-stream for the binary extension; a missing type is taken as JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type not in JSON_TYPES and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"content type {content_type!r} is not supported; send JSON")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"content encoding {encoding!r} is not supported")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or 413 past `max_bytes`, or 408 if it is not in within `timeout_s`
    (checked by a sweep, not a timer per request: see deadline_sweep.py)."""
    declared = request.headers.get("content-length")
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

    sweep = sweep_for(asyncio.get_running_loop(), timeout_s)
    sweep.arm(task, expire)
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:  # our deadline, and nobody else's cancel
            raise RequestTimeout(f"request body not received within {timeout_s:g} s") from None
        raise
    except ClientDisconnect:
        raise BadRequest("client disconnected while sending the body") from None
    finally:
        sweep.disarm(task)
    return b"".join(chunks)


def binary_header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
    return int(value)
