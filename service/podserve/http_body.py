"""Reading request bodies safely: size checked before reading, slow drips cut off."""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request

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
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length must be a non-negative integer")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > max_bytes:
                    raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise BadRequest("client disconnected while sending the body") from None
    return b"".join(chunks)


def binary_header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
    return int(value)
