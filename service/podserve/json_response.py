"""orjson-encoded responses (numpy arrays included): ~20x faster than stdlib json."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response

from podserve.response_compression import CompressibleResponse

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
JSON_TYPE = (b"content-type", b"application/json")
BINARY_TYPE = (b"content-type", b"application/octet-stream")


class PreparedResponse(Response):
    """A response whose header block is given as ASGI raw headers, ready to send.

    Starlette's init_headers lower-cases, encodes and searches every header of every
    response (~4 us for an inference answer); the inference endpoints know theirs already.
    """

    def __init__(self, body: bytes, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [(b"content-length", b"%d" % len(body)), *raw_headers]


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Compressed as it is sent when the request asks and it is large enough (a 200)."""
    return CompressibleResponse(
        orjson.dumps(content, option=OPTIONS),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )
