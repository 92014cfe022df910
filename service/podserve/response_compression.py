"""Compressed answers: `Content-Encoding: gzip` or `deflate` when the request's
`Accept-Encoding` asks for it (RFC 9110 12.5.3), as Triton's HTTP endpoint does and as
tritonclient's `response_compression_algorithm` asks.

Only bodies of PODSERVE_RESPONSE_COMPRESSION_MIN_BYTES or more are compressed, and only when
that makes them smaller; every answer of a route that may compress says `Vary: Accept-Encoding`,
so that a cache never hands a compressed answer to a client that did not ask. A request
without `Accept-Encoding` (podserve's load generators send none, or `identity`) costs a size
check and one lookup in the headers podserve has already read (request_headers.py): ~0.26 us
with the Vary header, on ~100 us of CPU per tabular request.

The binary tensor extension's `Inference-Header-Content-Length` keeps its meaning, the length
of the JSON part of the *uncompressed* body: tritonclient decompresses the whole body first,
then splits it there (tritonclient/http/_infer_result.py), as Triton's own server sends it.
"""

from __future__ import annotations

import asyncio
import zlib

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from podserve.request_headers import request_headers
from podserve.runtime import RUNTIME_SCOPE_KEY
from podserve.settings import Settings

# zlib level 1: real MiniLM answers shrink to ~47% where level 6 reaches ~44%, for 2-5x less
# CPU (one sentence, 4.8 KB: ~30-40 us vs ~100 us; 32 sentences, 150 KB: 1.3-1.9 ms vs 9.4 ms,
# in a worker process on the dev machine). Not a setting: the few % more that higher levels
# save are not worth the serving CPU, and it is one knob fewer.
LEVEL = 1
# Compressed on the event loop up to this size: 16 KiB at level 1 is ~85 us of CPU, about
# what a hop to a thread costs by itself (~65 us CPU, ~75 us wall when the loop is idle).
# A larger body (a batch of 32 embeddings: 1.3-1.9 ms) goes to a thread: zlib releases the
# GIL, and the loop serves other requests meanwhile.
COMPRESS_ON_LOOP_MAX_BYTES = 16 * 1024
# Content coding -> zlib wbits: gzip's wrapper, or zlib's (RFC 9110's "deflate", which
# tritonclient reads with zlib.decompress); "x-gzip" is gzip (RFC 9110 8.4.1.3).
WBITS = {"gzip": 31, "deflate": 15}
ALIASES = {"x-gzip": "gzip"}

# Clients list a handful of codings. A longer list (or an element with more parameters) is
# answered uncompressed, unread: a 60 KB header of commas took 8 ms of the loop to read.
MAX_ELEMENTS = 16

VARY = (b"vary", b"Accept-Encoding")
# What an answer adds to its headers, by the coding it was sent with (None: uncompressed).
ANSWER_HEADERS: dict[str | None, list[tuple[bytes, bytes]]] = {
    None: [VARY],
    **{coding: [VARY, (b"content-encoding", coding.encode())] for coding in WBITS},
}


def negotiate(accept_encoding: str) -> str | None:
    """The coding to answer with, "gzip" or "deflate", or None for no coding (identity).

    Tokens are case-insensitive; a coding's weight is its own `q` (the first listing of it),
    else that of `*`, else 0 (not acceptable). The higher weight wins, gzip on a tie; q=0 is
    a refusal. An explicitly listed `identity` weighted above the best coding is preferred.
    When nothing is acceptable (`*;q=0`, or `identity;q=0` alone), the answer goes
    uncompressed, as RFC 9110 allows, rather than as a 406. A malformed weight drops its
    element, never the request; more than MAX_ELEMENTS elements: uncompressed.
    """
    elements = accept_encoding.split(",", MAX_ELEMENTS)
    if len(elements) > MAX_ELEMENTS:
        return None
    weights: dict[str, float] = {}
    for element in elements:
        token, _, params = element.partition(";")
        token = token.strip().lower()
        weight = _weight(params) if params else 1.0
        if token and weight is not None:
            weights.setdefault(ALIASES.get(token, token), weight)
    default = weights.get("*", 0.0)
    gzip_q, deflate_q = weights.get("gzip", default), weights.get("deflate", default)
    coding, best = ("gzip", gzip_q) if gzip_q >= deflate_q else ("deflate", deflate_q)
    if best <= 0.0 or best < weights.get("identity", 0.0):
        return None
    return coding


def _weight(params: str) -> float | None:
    """The `q` of `;q=0.5;...`, 1 without one; None when it is not a number in [0, 1], or
    when the element has more than MAX_ELEMENTS parameters."""
    parts = params.split(";", MAX_ELEMENTS)
    for param in parts[:MAX_ELEMENTS]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                weight = float(value)
            except ValueError:
                return None
            return weight if 0.0 <= weight <= 1.0 else None  # NaN fails both comparisons
    return 1.0 if len(parts) <= MAX_ELEMENTS else None


def accepted_coding(scope: Scope, settings: Settings, size: int) -> str | None:
    """The coding to send a `size`-byte answer with, if compression is on, the answer is
    large enough and the request asked for one. Cheap first: a size check, then one lookup."""
    if size < settings.response_compression_min_bytes or not settings.response_compression:
        return None
    value = request_headers(scope).get("accept-encoding")
    if value is None:
        return None
    # The field may come on several lines, which make one list (RFC 9110 5.3); the dict kept
    # the first. A few us, only for answers about to be compressed (>= 10 us).
    lines = [raw for name, raw in scope["headers"] if name == b"accept-encoding"]
    if len(lines) > 1:
        value = b",".join(lines).decode("latin-1")
    return negotiate(value)


def compress(body: bytes, coding: str) -> bytes:
    return zlib.compress(body, LEVEL, wbits=WBITS[coding])


async def compress_answer(body: bytes, coding: str) -> tuple[bytes, str | None]:
    """The body compressed with `coding` (off the event loop when large), or as it was, with
    None, when compressing did not make it smaller (binary FP tensors barely shrink)."""
    if len(body) <= COMPRESS_ON_LOOP_MAX_BYTES:
        compressed = compress(body, coding)
    else:
        compressed = await asyncio.to_thread(compress, body, coding)
    if len(compressed) >= len(body):
        return body, None
    return compressed, coding


def compression_settings(scope: Scope) -> Settings | None:
    """The worker's settings if responses may be compressed (the runtime's, in every app
    request's scope), else None."""
    runtime = scope.get(RUNTIME_SCOPE_KEY)
    if runtime is None or not runtime.settings.response_compression:
        return None
    return runtime.settings


class CompressibleResponse(Response):
    """A JSON answer of the non-inference routes (metadata, configuration, statistics, the
    repository index) that is compressed as it is sent, when asked and large enough.
    Errors (any status but 200) are sent as they are, with `Vary` all the same."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = compression_settings(scope)
        if settings is not None:
            coding = None
            if self.status_code == 200:
                coding = accepted_coding(scope, settings, len(self.body))
            if coding is not None:
                self.body, coding = await compress_answer(self.body, coding)
            if coding is not None:
                length = (b"content-length", b"%d" % len(self.body))
                self.raw_headers = [
                    length if name == b"content-length" else (name, value)
                    for name, value in self.raw_headers
                ]
            self.raw_headers = [*self.raw_headers, *ANSWER_HEADERS[coding]]
        await super().__call__(scope, receive, send)
