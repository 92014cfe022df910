"""Reading request bodies safely: size checked before reading, slow drips cut off.

A body sent with `Content-Encoding: gzip` or `deflate` (tritonclient's
`request_compression_algorithm`) is inflated here, and the inflated size is held to the same
limit as a plain body, so a small compressed body cannot expand past it (a "zip bomb").
Answers are compressed only when the client asks (Accept-Encoding): response_compression.py.
"""

from __future__ import annotations

import asyncio
import weakref
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from podserve.client_disconnect import body_read
from podserve.deadline_sweep import sweep_for
from podserve.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from podserve.request_headers import request_headers

JSON_TYPES = ("application/json", "application/octet-stream")
# The binary tensor extension's request header: the JSON header's length in the body.
BINARY_HEADER = "inference-header-content-length"
# Content-Encoding -> zlib wbits: gzip's header, or zlib's (RFC 9110 "deflate"; raw deflate
# streams, which some clients send under that name, are tried when zlib's header is missing).
ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
# Deflate expands at most ~1032:1, so a body this small inflates to ~1 MiB at the most (~1 ms
# of CPU) and is inflated on the event loop; larger ones in a thread.
INFLATE_ON_LOOP_MAX_BYTES = 1024
# JSON tensors parse at ~35-70 MB/s (orjson, then numpy from lists): up to this size ~2 ms on
# the event loop; a larger body (up to PODSERVE_MAX_BODY_BYTES, 16 MiB: ~0.5 s) in a thread,
# so that this worker's other requests and timers get their turns meanwhile.
PARSE_ON_LOOP_MAX_BYTES = 64 * 1024
# Compressed input goes to zlib in pieces, from INFLATE_FIRST_CHUNK_BYTES doubling up to
# INFLATE_CHUNK_BYTES, for each member: when a member ends, zlib copies what it was handed past
# that end into `unused_data`. Handing it the whole rest of the body copied that rest once per
# gzip member, quadratic in the body (9.8 s for 4 MiB of empty 20-byte members); this way
# what is handed past a member's end is at most its own size plus 64 bytes: linear.
INFLATE_FIRST_CHUNK_BYTES = 64
INFLATE_CHUNK_BYTES = 64 * 1024
# Members in one gzip body, past which it is refused (400). Clients send one (tritonclient,
# curl, Python's gzip), concatenated files a few, and bgzip, the commonest writer of many, one
# per 64 KiB inflated: 256 within the default 16 MiB limit. Each member costs a fresh
# decompressor, ~2 us for an empty one: uncapped, 16 MiB of them would still take 1-2 s of CPU,
# where the cap refuses such a body after a few ms.
MAX_GZIP_MEMBERS = 1000
# uvicorn's HIGH_WATER_LIMIT: it pauses reading once a body buffers past this.
READ_PAUSE_BYTES = 64 * 1024

T = TypeVar("T")


async def parse_body(parse: Callable[..., T], body: bytes, *args: Any) -> T:
    """parse(body, *args): on the event loop for a small body, in a thread for a large one.
    By the whole body, binary extension included: its FP tensors are views (a large image pays
    one thread hop, ~0.1 ms), but its BYTES elements are decoded one by one."""
    if len(body) <= PARSE_ON_LOOP_MAX_BYTES:
        return parse(body, *args)
    # One large parse at a time per worker: JSON numbers become Python objects first, ~13x
    # the body (16 MiB of zeros: ~200 MiB), and six at once took a worker's peak memory up
    # 190-470 MiB more than one did. The parse holds the GIL: they never ran in parallel.
    async with _large_parse_slot():
        return await asyncio.to_thread(parse, body, *args)


_LARGE_PARSES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _large_parse_slot() -> asyncio.Semaphore:
    """The running loop's own (a semaphore belongs to the first loop that waits on it)."""
    loop = asyncio.get_running_loop()
    slot = _LARGE_PARSES.get(loop)
    if slot is None:
        slot = _LARGE_PARSES[loop] = asyncio.Semaphore(1)
    return slot


def check_content_type(request: Request) -> None:
    """JSON, or octet-stream for the binary extension; a missing type is taken as JSON."""
    headers = request_headers(request.scope)
    content_type = headers.get("content-type", "")
    if content_type not in JSON_TYPES:  # the exact common values skip the parsing below
        content_type = content_type.split(";")[0].strip().lower()
        if content_type and content_type not in JSON_TYPES and not content_type.endswith("+json"):
            raise UnsupportedMediaType(
                f"content type {content_type!r} is not supported: send the header "
                "'Content-Type: application/json' (curl's -d sends a form type unless given "
                "-H 'Content-Type: application/json'), or, for V2's binary tensor extension, "
                "'Content-Type: application/octet-stream' with Inference-Header-Content-Length"
            )
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity") and encoding not in ENCODINGS:
        raise UnsupportedMediaType(
            f"content encoding {encoding!r} is not supported; send gzip, deflate or identity"
        )


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body (inflated if it came compressed), or 413 past `max_bytes`, or 408 if it
    is not in within `timeout_s` (checked by a sweep, not a timer per request: see
    deadline_sweep.py)."""
    headers = request_headers(request.scope)
    declared = headers.get("content-length")

    if declared is not None:
        # isascii: "²" is a digit to isdigit() but not to int(); HTTP allows only 0-9.
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest("Content-Length must be a non-negative integer")
        if len(declared) > 4000 or int(declared) > max_bytes:  # int() stops at 4300 digits
            raise PayloadTooLarge(f"body of {declared[:40]} bytes exceeds the limit of {max_bytes}")
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
            # Half a body read: the connection cannot carry another request. Say so (RFC
            # 9110 15.5.9), and the server closes it (lingering: the rest may still come).
            raise RequestTimeout(
                f"request body not received within {timeout_s:g} s",
                headers={"connection": "close"},
            ) from None
        raise
    finally:
        sweep.disarm(task)
    if total > READ_PAUSE_BYTES:  # uvicorn may have paused reading: see client_disconnect.py
        body_read(request.scope)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get("content-encoding")
    if encoding is None:
        return body
    wbits = ENCODINGS.get(encoding.strip().lower())
    if wbits is None:  # identity; an unknown coding was refused by check_content_type
        return body
    if len(body) <= INFLATE_ON_LOOP_MAX_BYTES:
        return inflate(body, wbits, max_bytes)
    return await asyncio.to_thread(inflate, body, wbits, max_bytes)  # CPU: off the loop


def inflate(body: bytes, wbits: int, max_bytes: int) -> bytes:
    """Decompress, never producing more than `max_bytes` (413), or 400 for corrupt data."""
    try:
        return _inflate_members(body, wbits, max_bytes)
    except zlib.error as exc:
        if wbits == ENCODINGS["deflate"]:  # no zlib header: try a raw deflate stream
            try:
                return _inflate_members(body, -15, max_bytes)
            except zlib.error:
                pass
        raise BadRequest(f"request body is not valid compressed data ({exc})") from None


def _inflate_members(body: bytes, wbits: int, max_bytes: int) -> bytes:
    out = bytearray()
    view = memoryview(body)  # slices of it are not copies
    start = 0  # where the current member begins
    members = 1
    while True:  # gzip allows several members one after the other (RFC 1952 2.2)
        inflater = zlib.decompressobj(wbits)
        offset, size = start, INFLATE_FIRST_CHUNK_BYTES
        while not inflater.eof and offset < len(body):
            chunk = view[offset : offset + size]
            offset += len(chunk)
            size = min(2 * size, INFLATE_CHUNK_BYTES)
            out += inflater.decompress(chunk, max_bytes + 1 - len(out))
            if len(out) > max_bytes:
                raise PayloadTooLarge(f"decompressed body exceeds the limit of {max_bytes} bytes")
        if not inflater.eof:
            raise BadRequest("request body is truncated compressed data")
        start = offset - len(inflater.unused_data)  # the next member's first byte, if any
        if start == len(body):
            return bytes(out)
        if wbits != ENCODINGS["gzip"]:
            raise BadRequest("request body has data after the end of its compressed stream")
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise BadRequest(
                f"request body has more than {MAX_GZIP_MEMBERS} gzip members; "
                "send it as one gzip stream"
            )


def binary_header_length(request: Request) -> int | None:
    value = request_headers(request.scope).get(BINARY_HEADER)
    if value is None:
        return None
    # isascii: "²" is a digit to isdigit() but not to int(); int() stops at 4300 digits.
    if not (value.isascii() and value.isdigit()) or len(value) > 4000:
        raise BadRequest(
            "Inference-Header-Content-Length must be a non-negative integer no larger than the body"
        )
    return int(value)
