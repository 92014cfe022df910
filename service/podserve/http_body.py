"""Reading request bodies safely: size checked before reading, slow drips cut off.

A body sent with `Content-Encoding: gzip` or `deflate` (tritonclient's
`request_compression_algorithm`) is inflated here, and the inflated size is held to the same
limit as a plain body, so a small compressed body cannot expand past it (a "zip bomb").
The bytes of all bodies a worker holds at once, read and inflated, are held to
PODSERVE_MAX_BODY_BYTES_IN_FLIGHT: past it a request is refused (503) before more is read or
inflated, so many concurrent large (or small compressed) bodies cannot take a worker's memory
past its limit. A request's share is given back when its task ends, on every path. Refusals
count as `body_budget` rejections; the bytes held are a gauge (metrics.py).
Answers are compressed only when the client asks (Accept-Encoding): response_compression.py.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from podserve.client_disconnect import body_read
from podserve.deadline_sweep import sweep_for
from podserve.errors import (
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
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
# Inflated output per zlib call, reserved from the in-flight budget before the call: 64 KiB of
# input could inflate to 64 MiB in one call.
INFLATE_OUT_BYTES = 1024 * 1024
# Members in one gzip body, past which it is refused (400). Clients send one (tritonclient,
# curl, Python's gzip), concatenated files a few, and bgzip, the commonest writer of many, one
# per 64 KiB inflated: 256 within the default 16 MiB limit. Each member costs a fresh
# decompressor, ~2 us for an empty one: uncapped, 16 MiB of them would still take 1-2 s of CPU,
# where the cap refuses such a body after a few ms.
MAX_GZIP_MEMBERS = 1000
# uvicorn's HIGH_WATER_LIMIT: it pauses reading once a body buffers past this.
READ_PAUSE_BYTES = 64 * 1024
# A declared body reserved whole is checked this many times per body-read timeout: one that
# cannot arrive before its deadline at its pace so far keeps only the bytes it has sent.
PACE_CHECKS = 10
# runtime.RUNTIME_SCOPE_KEY (not imported: runtime imports the jobs, which import this module).
_RUNTIME_SCOPE_KEY = "podserve.runtime"

# This process's (a worker's) request-body bytes held: one count for all its requests. A lock:
# inflation reserves from a thread.
_budget_lock = threading.Lock()
_held_bytes = 0


def body_bytes_held() -> int:
    """Request-body bytes this worker holds now (PODSERVE_MAX_BODY_BYTES_IN_FLIGHT's count)."""
    return _held_bytes


class BodyBudgetFull(Overloaded):
    """503 for the body budget (or its inflate slot), not a full queue: counted under its own
    rejection reason, so that an operator can tell the two apart."""


class BodyHold:
    """One request's share of the in-flight budget: taken as its body is read and inflated,
    all given back by end() (its task's done callback) on every path; a take after end()
    (an inflation thread outliving a cancelled request) is refused, so nothing leaks."""

    __slots__ = ("amount", "ended", "limit", "retry_after_s")

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.amount = 0
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.ended = False

    def take(self, amount: int) -> None:
        """Reserve `amount` more bytes, or 503 (Retry-After) if the worker holds too many.
        A request holding all that is held may go past the limit (its compressed body and
        what it inflates, both up to PODSERVE_MAX_BODY_BYTES): one alone is never refused."""
        global _held_bytes
        with _budget_lock:
            if not self.ended and (
                _held_bytes + amount <= self.limit or _held_bytes == self.amount
            ):
                _held_bytes += amount
                self.amount += amount
                return
            held = _held_bytes
        raise BodyBudgetFull(
            f"this worker holds {held} bytes of request bodies, and {amount} more would pass "
            f"PODSERVE_MAX_BODY_BYTES_IN_FLIGHT ({self.limit}); retry shortly",
            self.retry_after_s,
        )

    def give(self, amount: int) -> None:
        global _held_bytes
        with _budget_lock:
            amount = min(amount, self.amount)
            _held_bytes -= amount
            self.amount -= amount

    def end(self, _task: object = None) -> None:
        global _held_bytes
        with _budget_lock:
            _held_bytes -= self.amount
            self.amount = 0
            self.ended = True


def _budget_of(request: Request, max_bytes: int) -> tuple[int, int]:
    """(PODSERVE_MAX_BODY_BYTES_IN_FLIGHT, PODSERVE_RETRY_AFTER_S) as this request's runtime
    has them; a bare scope (unit tests): the defaults."""
    runtime = request.scope.get(_RUNTIME_SCOPE_KEY)
    if runtime is None:
        return 4 * max_bytes, 1
    return runtime.settings.body_bytes_in_flight_limit, runtime.settings.retry_after_s


def _hold_for(request: Request, max_bytes: int, task: asyncio.Task[Any]) -> BodyHold:
    """This request's hold, given back when its task ends (after the answer is sent, or on
    any error or cancellation)."""
    hold = BodyHold(*_budget_of(request, max_bytes))
    task.add_done_callback(hold.end)
    return hold


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
    async with _large_slot(_LARGE_PARSES):
        return await asyncio.to_thread(parse, body, *args)


_Slots = weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
_LARGE_PARSES: _Slots = weakref.WeakKeyDictionary()
_LARGE_INFLATES: _Slots = weakref.WeakKeyDictionary()


def _large_slot(slots: _Slots) -> asyncio.Semaphore:
    """The running loop's own (a semaphore belongs to the first loop that waits on it)."""
    loop = asyncio.get_running_loop()
    slot = slots.get(loop)
    if slot is None:
        slot = slots[loop] = asyncio.Semaphore(1)
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
        if len(declared) > 4000 or (size := int(declared)) > max_bytes:  # int(): 4300 digits
            raise PayloadTooLarge(f"body of {declared[:40]} bytes exceeds the limit of {max_bytes}")
    task = asyncio.current_task()
    assert task is not None
    # The in-flight budget counts a body past what uvicorn buffers per connection anyway
    # (READ_PAUSE_BYTES, before the app reads a byte): small plain bodies cost nothing here.
    # A declared body is reserved whole once more than that has arrived: not before (headers
    # declaring 16 MiB and then nothing would hold a quarter of the budget for the whole
    # body-read timeout), and not chunk by chunk (concurrent uploads would each hold a part
    # and all be refused: 6 of 6 in a burst). A chunked body is reserved as it arrives, and
    # so is a declared one that falls behind: at its pace so far, it would not arrive before
    # its deadline (408 then anyway), so its whole size is given back, and a client that sent
    # 64 KiB and stalled holds 64 KiB, not 16 MiB for the whole timeout.
    hold = None
    chunks: list[bytes] = []
    total = 0
    covered = 0  # of the body's bytes, how many `hold` covers
    expired = False
    loop = asyncio.get_running_loop()
    started = loop.time()
    pace = None  # the sweep that checks a declared body's pace, once it is held whole

    def check_pace() -> None:
        nonlocal covered
        assert hold is not None and pace is not None
        elapsed = loop.time() - started
        if (covered - total) * elapsed > total * (timeout_s - elapsed):  # behind its deadline
            hold.give(covered - total)
            covered = total
        else:
            pace.arm(hold, check_pace)

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    receive = request.receive  # the ASGI messages themselves: no stream generator per request
    sweep = sweep_for(loop, timeout_s)
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
            if total > READ_PAUSE_BYTES:  # what uvicorn does not buffer anyway: counted
                if hold is None:
                    hold = _hold_for(request, max_bytes, task)
                    hold.take(wanted := total if declared is None else size)
                    covered = wanted
                    if covered > total:
                        pace = sweep_for(loop, timeout_s / PACE_CHECKS)
                        pace.arm(hold, check_pace)
                elif total > covered:
                    hold.take(total - covered)
                    covered = total
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
        if pace is not None:
            pace.disarm(hold)
    if total > READ_PAUSE_BYTES:  # uvicorn may have paused reading: see client_disconnect.py
        body_read(request.scope)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get("content-encoding")
    if encoding is None:
        return body
    wbits = ENCODINGS.get(encoding.strip().lower())
    if wbits is None:  # identity; an unknown coding was refused by check_content_type
        return body
    body_held = 0  # the compressed body's reservation, given back once it is inflated
    if hold is None:
        hold = _hold_for(request, max_bytes, task)
    else:
        body_held = hold.amount
    if len(body) <= INFLATE_ON_LOOP_MAX_BYTES:
        inflated = inflate(body, wbits, max_bytes, hold)
    else:
        # CPU: off the loop. One at a time, as parses are: inflations reserving the budget
        # side by side starved each other (64 at once, each 1 MiB short: 63 refused).
        slot = _large_slot(_LARGE_INFLATES)
        await _acquire_inflate_slot(slot, timeout_s, hold.retry_after_s)
        try:
            inflated = await asyncio.to_thread(inflate, body, wbits, max_bytes, hold)
        finally:
            slot.release()
    hold.give(body_held)  # the compressed body is dropped on return; the inflated is held
    return inflated


async def _acquire_inflate_slot(slot: asyncio.Semaphore, timeout_s: float, retry_s: int) -> None:
    """The worker's inflate slot, or 503 + Retry-After past the body-read timeout: waiting
    unbounded, a queue of compressed bodies (each holding its share of the budget) waited as
    long as the bodies ahead took, however long that was."""
    if not slot.locked():  # free: taken at once, without a timer (see deadline_sweep.py)
        await slot.acquire()
        return
    try:
        async with asyncio.timeout(timeout_s):
            await slot.acquire()
    except TimeoutError:
        raise BodyBudgetFull(
            f"waited {timeout_s:g} s (PODSERVE_BODY_READ_TIMEOUT_S) for this worker's other "
            "compressed request bodies to be inflated; retry shortly",
            retry_s,
        ) from None


def inflate(body: bytes, wbits: int, max_bytes: int, hold: BodyHold | None = None) -> bytes:
    """Decompress, never producing more than `max_bytes` (413), or 400 for corrupt data; the
    output is reserved from `hold` before each zlib call (503 when the worker has no room)."""
    held = hold.amount if hold is not None else 0
    try:
        return _inflate_members(body, wbits, max_bytes, hold)
    except zlib.error as exc:
        if hold is not None:
            hold.give(hold.amount - held)  # what the failed try produced is dropped
        if wbits == ENCODINGS["deflate"]:  # no zlib header: try a raw deflate stream
            try:
                return _inflate_members(body, -15, max_bytes, hold)
            except zlib.error:
                pass
        raise BadRequest(f"request body is not valid compressed data ({exc})") from None


def _inflate_members(body: bytes, wbits: int, max_bytes: int, hold: BodyHold | None) -> bytes:
    out = bytearray()
    view = memoryview(body)  # slices of it are not copies
    start = 0  # where the current member begins
    members = 1
    while True:  # gzip allows several members one after the other (RFC 1952 2.2)
        inflater = zlib.decompressobj(wbits)
        offset, size = start, INFLATE_FIRST_CHUNK_BYTES
        full = False  # the last call filled its output: input (or output) may be left in zlib
        while not inflater.eof:
            if full:  # a suffix of the last chunk (or b"": output zlib still holds)
                chunk = inflater.unconsumed_tail
            elif offset < len(body):
                chunk = view[offset : offset + size]
                offset += len(chunk)
                size = min(2 * size, INFLATE_CHUNK_BYTES)
            else:
                break
            step = min(max_bytes + 1 - len(out), INFLATE_OUT_BYTES)
            if hold is not None:
                hold.take(step)
            piece = inflater.decompress(chunk, step)
            if hold is not None and len(piece) < step:
                hold.give(step - len(piece))
            full = len(piece) == step
            out += piece
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
