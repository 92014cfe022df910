"""Bounds on reading request headers: a slow drip of headers must not hold a connection forever.

uvicorn (0.55, httptools and h11 alike) starts no timer before a request's headers are
complete: a client that connects and sends nothing, or drips header bytes, keeps its socket
and memory for ever, and httptools buffers a header of any size. There is no uvicorn or
Gunicorn setting for this, so the worker uses the protocol class below (uvicorn accepts a
class for its `http` option), a subclass of uvicorn's httptools protocol: podserve depends on
uvicorn[standard], which brings httptools (h11 has no parser callbacks to hook: unsupported).
Like nginx's `client_header_timeout`: the headers of a request must be complete within
PODSERVE_HEADER_READ_TIMEOUT_S of its first byte (or of the connection), and within
PODSERVE_MAX_HEADER_BYTES, else 408 / 431 and the connection closes.
The deadlines are checked by a sweep (deadline_sweep.py), not a timer per request.
Idle keep-alive connections between requests stay governed by PODSERVE_KEEPALIVE_S; a slow
*body* is bounded by PODSERVE_BODY_READ_TIMEOUT_S in the route (408).

Where one request ends and the next begins is what the parser says (httptools' callbacks:
message begin, headers complete, message complete), not whether the last response is done:

- a pipelined request, sent while the one before it is still being served, is bounded like
  any other from its first byte (uvicorn feeds its headers to httptools at once, and httptools
  grows a header value quadratically: 40 MiB of one value stalled the worker's loop for
  seconds). Its 408 / 431 is written once the response in flight is complete, never in the
  middle of it; until then nothing more is read from the connection. The bytes of a request
  that begins within the same read as the end of the one before are not counted (at most one
  read, ~256 KB; where a body ends in them is the parser's to know);
- the rest of a body answered before it was read (401, 404, 413 by Content-Length) is not the
  next request's headers: it is read and dropped, as uvicorn does, within
  PODSERVE_HEADER_READ_TIMEOUT_S of the answer (then the connection closes without a word),
  and the connection then serves its next request or idles for PODSERVE_KEEPALIVE_S.

Requests parsed ahead of the answers, and answers nobody reads (uvicorn bounds neither):

- uvicorn parses every request of a read and queues each behind the one being answered
  before it pauses reading: one 256 KiB read of small pipelined GETs made ~6000 queued
  request cycles, +15 MiB of the worker's memory, held for as long as the client did not
  read. A connection now has at most _MAX_QUEUED requests queued (plus what one slice of a
  read holds): a longer read is parsed a slice at a time, and once the queue is full the
  rest of the read is held unparsed, with reading paused, until an answer completes;
- a client that reads nothing holds its connection for ever (its answer waits for the
  socket; keep-alive and header timeouts never start): once the transport has asked to
  stop writing (its buffer is full), the connection is aborted once the client has taken
  nothing of what waits to be sent for PODSERVE_BODY_READ_TIMEOUT_S (the bound on a client
  sending its body; like nginx's send_timeout, a slow reader that makes progress stays).

Every close of a connection that still has input coming is a lingering close (nginx's; RFC
9112 9.6): the answer, then a FIN, and what the client still sends is read and dropped until
it closes too, for at most PODSERVE_HEADER_READ_TIMEOUT_S and twice PODSERVE_MAX_BODY_BYTES
(then it is closed: one that sends on and never reads cannot hold the worker's loop). Closing
with input unread sends a reset, which drops whatever the kernel has not sent yet: the answer.
That was the fate of a `Connection: close` request (urllib sends it on every request; HTTP/1.0)
answered before its body was read (404, 405, 413 by Content-Length: measured, 5 of 5 such
answers to 8 MB bodies lost), of one answered so while podserve closes the connection itself
(draining, connection_balance), of a 400 for an unparsable request, and of the guard's own
408 / 431. Input is coming when the parser is inside a request (its body, or the headers of
a pipelined one), or the kernel holds bytes not read yet (FIONREAD: one ioctl per close, and
only where the parser is between requests); a close with none is an ordinary close.

Errors found before the app, by the parser (uvicorn answers those in text/plain), are
answered in JSON as the app's are ({"error": ...}, the V2 protocol's shape), with the
parser's reason, and the guard's answers carry uvicorn's cached Date (RFC 9110 6.6.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sys
import termios
from http import HTTPStatus
from typing import Any

import orjson

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError as exc:  # pragma: no cover - uvicorn[standard] brings httptools
    raise ImportError(
        "podserve needs httptools, which uvicorn[standard] installs: "
        "pip install 'uvicorn[standard]'"
    ) from exc

from podserve import log_control, write_coalescing
from podserve.deadline_sweep import sweep_for
from podserve.settings import get_settings

# Requests queued behind the one being answered, per connection (uvicorn's `pipeline`). A
# connection is answered one request at a time, so a longer queue buys a pipelining client
# nothing: 8 keeps its next requests parsed and ready, and bounds what one connection holds.
_MAX_QUEUED = 8
# A longer read is parsed a slice of this at a time, the queue checked in between: a slice
# queues at most ~230 requests (~500 KiB; 18 bytes is the shortest), a read of an ordinary
# request is one slice, and a 256 KiB read of a body was measured no slower in 64 slices than
# whole (1 KiB slices: twice as slow).
_SLICE_BYTES = 4096

# What a client must take of a stalled answer within the stall bound to keep its connection
# (16 KiB: the transport's own low-water mark). Not one byte: a client that reads nothing
# still lets the kernel move a few dozen bytes now and then (window updates).
_WRITE_PROGRESS_BYTES = 16 * 1024
# SIOCOUTQ: what a socket's kernel send queue holds, not yet acknowledged by the peer.
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
# SIOCINQ: what its receive queue holds, not read yet.
_INQ: int | None = getattr(termios, "FIONREAD", None)

# The first byte of a TLS handshake record (and of an SSLv2-style ClientHello), and the start
# of HTTP/2's connection preface: a client that speaks those to a plain HTTP/1.1 port.
_TLS_FIRST_BYTES = (0x16, 0x80)
_H2_PREFACE = b"PRI * HTTP/2.0"
_PLAIN_PORT = "this port speaks plain HTTP/1.1"

# Where the parser is on a connection (httptools' callbacks move it).
_IDLE = 0  # between requests: the next byte starts one
_HEADERS = 1  # inside a request's headers
_BODY = 2  # headers complete, inside the body (or a body-less request about to complete)


def _reply(status: int, message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """An error answer as the app's ({"error": ...}) that closes the connection, with uvicorn's
    default headers: its Date (cached, renewed each second) and Server, as on every answer."""
    body = orjson.dumps({"error": message})
    head = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    head += [b"%s: %s\r\n" % header for header in default_headers]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join([*head, body])


def _parse_error_message(error: BaseException | None, data: bytes | memoryview) -> str:
    """What a 400 for an unparsable request says: the parser's reason, or what the client
    seems to speak instead (`data`: the read in which the parser failed)."""
    if data[:1] and data[0] in _TLS_FIRST_BYTES:
        return f"TLS handshake received: {_PLAIN_PORT}, without TLS"
    reason = str(error) if error is not None else ""
    if bytes(data[: len(_H2_PREFACE)]) == _H2_PREFACE or reason == "Pause on PRI/Upgrade":
        return f"HTTP/2 connection preface received: {_PLAIN_PORT} only"
    return f"invalid HTTP request: {reason}" if reason else "invalid HTTP request"


class CoalescingTransport(write_coalescing.CoalescingTransport):
    """write_coalescing's transport, whose close() is its protocol's: a lingering close while
    input is still coming. While it lingers it is closing to everyone (uvicorn then neither
    arms its keep-alive timer nor starts a queued request, and the guard reads no HTTP)."""

    __slots__ = ()

    def close(self) -> None:
        self._protocol._close_connection()

    def is_closing(self) -> bool:
        return self._protocol._guard_lingering or self._transport.is_closing()


def _close_now(transport: Any) -> None:
    """Close at once (its held write flushed first), whatever the wrapper's close() does."""
    write_coalescing.CoalescingTransport.close(transport)


class HeaderGuardProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound on request headers, a
    bound on the requests queued per connection, and on a write stalled by its client, and
    lingering closes. The bounds are class attributes, set by guarded_protocol()."""

    header_read_timeout_s: float  # for a request's headers, and for a lingering close
    max_header_bytes: int
    write_stall_s: float  # a client that takes nothing of a stalled answer for this is cut off
    linger_max_bytes: int  # what a lingering close drops at most

    _guard_lingering = False  # (read by the transport's is_closing from its creation on)

    # Called for every request: the parent's functions directly, not through super().
    _parent_message_begin = HttpToolsProtocol.on_message_begin
    _parent_headers_complete = HttpToolsProtocol.on_headers_complete
    _parent_message_complete = HttpToolsProtocol.on_message_complete

    # uvicorn decides once per connection whether to write access-log lines; podserve's
    # switch (POST /v2/logging, log_control.py) holds for open connections too.
    @property
    def access_log(self) -> bool:
        return log_control.access_log_enabled()

    @access_log.setter
    def access_log(self, _connection_default: bool) -> None:
        pass

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescingTransport(transport, self)
        self._guard_deadlines = sweep_for(self.loop, self.header_read_timeout_s)
        self._guard_armed = False
        self._guard_bytes = 0
        self._guard_tail = b""
        self._guard_phase = _IDLE
        self._guard_discarding = False  # reading the rest of a body answered early
        self._guard_body_ended = False  # ... and it ended in the last read (or the parser
        # failed there: _guard_parse_error)
        self._guard_refusal: bytes | None = None  # to write once the answer in flight is
        self._guard_lingering = False  # closing: the rest of the input is dropped
        self._guard_linger_left = 0  # bytes it may still drop
        self._guard_parse_error: BaseException | None = None  # to answer (400)
        self._guard_held = b""  # read but not parsed: the queue was full
        self._guard_write_stall: asyncio.TimerHandle | None = None
        self._guard_write_left = 0  # bytes waiting to be sent when last looked at
        self._arm()  # the first request's headers are due from the connect on

    def data_received(self, data: bytes) -> None:
        if self._guard_held or len(self.pipeline) >= _MAX_QUEUED:
            self._hold(data)  # after what is held already: the order is kept
        elif len(data) <= _SLICE_BYTES:
            self._parse(data)
        else:
            self._parse_in_slices(data)

    def _parse(self, data: bytes | memoryview) -> None:
        if self._guard_lingering:  # answered and closing: the rest is not read as HTTP
            self._drop_lingering(len(data))
            return
        if self._guard_refusal is not None:  # refused; waiting for the answer in flight
            self.flow.pause_reading()  # (the app's receive() may have resumed reading)
            return
        if not self._guard_armed and self._guard_phase != _BODY:
            self._arm()  # first byte of the next request on a keep-alive connection
        if self._guard_armed:
            self._guard_bytes += self._header_part(data)
            if self._guard_bytes > self.max_header_bytes:  # before parsing: in one burst too
                if not self.transport.is_closing():
                    self._refuse(431, f"request headers exceed {self.max_header_bytes} bytes")
                return
        super().data_received(data)
        self._parsed(data)

    def _parsed(self, data: bytes | memoryview) -> None:
        """After the parser has had `data`: its callbacks may have completed headers (and
        disarmed), begun a pipelined request, ended a body, or failed."""
        if self._guard_armed:
            if self.transport.get_protocol() is not self:
                self._disarm()  # upgraded (complete headers disarmed in on_headers_complete)
        elif self._guard_phase == _HEADERS and not self.transport.is_closing():
            # The next request began in this read, after the end of the one before (a
            # pipelined request): bounded from here on. Its bytes in this read are not
            # counted (at most one read's worth; a body's cannot be told from them).
            self._arm()
            self._guard_tail = bytes(data[-3:])  # data may be a slice (memoryview)
        if self._guard_body_ended:  # (or the parser failed: one check for both)
            self._guard_body_ended = False
            if self._guard_parse_error is not None:
                self._answer_parse_error(data)
            else:
                self._idle_after_discarding()

    def _parse_in_slices(self, data: bytes) -> None:
        """Parse `data` a slice at a time; hold the rest once the queue is full."""
        view = memoryview(data)
        for start in range(0, len(data), _SLICE_BYTES):
            if len(self.pipeline) >= _MAX_QUEUED:
                self._hold(data[start:])
                return
            self._parse(view[start : start + _SLICE_BYTES])
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                if self._guard_lingering:  # the rest of the read is dropped too
                    self._drop_lingering(max(0, len(data) - start - _SLICE_BYTES))
                return  # refused, closed or upgraded: the rest is not for this parser

    def _hold(self, data: bytes) -> None:
        """Keep `data` unparsed, and read nothing more, until the queue shrinks. uvicorn
        resumes reading whenever an app awaits receive(): a read that comes then is held
        too and reading paused again (a subclass of its FlowControl that refused those
        resumes cost ~5% CPU per request: measured)."""
        self._guard_held += data
        self.flow.pause_reading()
        if self._guard_armed:  # headers cut by the slice: the wait is ours, not the client's
            self._guard_deadlines.disarm(self)

    def _parse_held(self) -> None:
        """An answer is complete: parse what was held, as far as the queue allows."""
        if len(self.pipeline) >= _MAX_QUEUED:
            self.flow.pause_reading()  # uvicorn resumed it; the queue is still full
            return
        held = self._guard_held
        self._drop_held()
        self.flow.resume_reading()  # as uvicorn meant to; paused again if the queue fills
        if self._guard_armed:
            self._guard_deadlines.arm(self, self._expired)
        self._parse_in_slices(held)

    def _drop_held(self) -> None:
        self._guard_held = b""

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._guard_write_stall is None:  # the client has stopped reading, for now
            self._watch_write_stall()

    def _watch_write_stall(self) -> None:
        self._guard_write_left = self._unsent()
        self._guard_write_stall = self.loop.call_later(self.write_stall_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._cancel_write_stall()
        super().resume_writing()

    def _cancel_write_stall(self) -> None:
        if self._guard_write_stall is not None:
            self._guard_write_stall.cancel()
            self._guard_write_stall = None

    def _write_stalled(self) -> None:
        """Writing is still paused `write_stall_s` on. A client that took some of the answer
        meanwhile reads slowly: wait on (as nginx's send_timeout). One that took next to
        nothing is cut off: abort, as close() would wait to flush the answer for ever."""
        self._guard_write_stall = None
        if self._unsent() <= self._guard_write_left - _WRITE_PROGRESS_BYTES:
            self._watch_write_stall()
        else:
            self.transport.abort()

    def _unsent(self) -> int:
        """Bytes the client has not taken: the transport's and, where the kernel tells
        (Linux), the socket's. The transport's buffer alone moves only once the kernel's
        has much room again: megabytes on a fast link, a long wait for a slow reader."""
        unsent: int = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if _OUTQ is not None and sock is not None:
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                queued = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
                unsent += int.from_bytes(queued, sys.byteorder, signed=True)
        return unsent

    def _header_part(self, data: bytes | memoryview) -> int:
        """How many bytes of data belong to the headers (the body's are not counted)."""
        tail, self._guard_tail = self._guard_tail, (self._guard_tail + data[-3:])[-3:]
        end = (tail + data).find(b"\r\n\r\n")  # the blank line may straddle two chunks
        return len(data) if end < 0 else max(0, end + 4 - len(tail))

    def on_message_begin(self) -> None:
        self._guard_phase = _HEADERS
        self._parent_message_begin()

    def on_headers_complete(self) -> None:
        self._guard_phase = _BODY
        if self._guard_armed:
            self._guard_armed = False
            self._guard_deadlines.disarm(self)
        self._parent_headers_complete()

    def on_message_complete(self) -> None:
        self._guard_phase = _IDLE
        if self._guard_discarding:  # the rest of a body answered early is in
            self._guard_discarding = False
            self._guard_deadlines.disarm(self)
            self._guard_body_ended = True
        self._parent_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (
            self._guard_held or len(self.pipeline) >= _MAX_QUEUED
        ) and not self.transport.is_closing():
            self._parse_held()
        if self.transport.is_closing() or self._response_pending():
            return  # closed with its answer, or the next pipelined request runs
        if self._guard_refusal is not None:
            refusal, self._guard_refusal = self._guard_refusal, None
            self._write_and_close(refusal)
        elif self._guard_phase == _BODY:
            # Answered before its body was read in full (401, 404, 413...): uvicorn reads
            # the rest and drops it. That is no request's headers, but it is bounded too.
            self._guard_discarding = True
            self._guard_deadlines.arm(self, self._discarding_expired)

    def _idle_after_discarding(self) -> None:
        """The rest of a body answered early ended in the last read. uvicorn armed its
        keep-alive timer when the answer was complete and cancelled it on the next read:
        arm it again if no request follows, or the connection would idle for ever."""
        if (
            self._guard_phase == _IDLE
            and not self._guard_armed
            and not self.transport.is_closing()
            and not self._response_pending()
            and self.timeout_keep_alive_task is None
        ):
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _discarding_expired(self) -> None:  # called by the sweep
        self._guard_discarding = False
        if not self.transport.is_closing():
            _close_now(self.transport)  # answered already: no second response

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard_armed = self._guard_discarding = self._guard_lingering = False
        self._guard_deadlines.disarm(self)
        self._cancel_write_stall()
        self._drop_held()
        super().connection_lost(exc)

    def _response_pending(self) -> bool:
        """A request's response (the last one parsed: uvicorn answers in order) is due;
        if that request was dropped (_drop_request), one queued before it."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return False
        return not cycle.disconnected or bool(self.pipeline)

    def _arm(self) -> None:
        self._guard_bytes = 0
        self._guard_tail = b""
        self._guard_armed = True
        self._guard_deadlines.arm(self, self._expired)

    def _disarm(self) -> None:
        if self._guard_armed:
            self._guard_armed = False
            self._guard_deadlines.disarm(self)

    def _expired(self) -> None:  # called by the sweep, which has dropped our deadline
        self._guard_armed = False
        if self.transport.is_closing():
            return
        if self._guard_bytes == 0 and self._guard_phase != _HEADERS:
            self._close_after(b"")  # never sent a byte: close quietly, as nginx does
        else:
            timeout_s = self.header_read_timeout_s
            self._refuse(408, f"request headers not received within {timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        self._close_after(_reply(status, message, self.server_state.default_headers))

    def send_400_response(self, msg: str) -> None:
        """The parser failed (uvicorn calls this from its data_received, handling the
        parser's exception): answered, in JSON with the reason, once _parsed has the read
        at hand (whether it looks like TLS or HTTP/2 is in its first bytes)."""
        self._guard_parse_error = sys.exc_info()[1] or ValueError(msg)
        self._guard_body_ended = True  # _parsed's check after the parser: see there

    def _answer_parse_error(self, data: bytes | memoryview) -> None:
        error, self._guard_parse_error = self._guard_parse_error, None
        if error is None or self.transport.is_closing():
            return  # answered already
        self._disarm()
        message = _parse_error_message(error, data)
        reply = _reply(400, message, self.server_state.default_headers)
        cycle = self.cycle
        if self._guard_phase == _BODY and cycle is not None:  # a body the parser refused
            if cycle.response_complete:
                self._linger()  # answered before its body was read: no second answer
                return
            self._drop_request(cycle)  # it can never be read: its app gets a disconnect
            if cycle.response_started:
                self._linger()  # no status line in the middle of an answer
                return
        self._close_after(reply)  # after the answer in flight, if one is

    def _drop_request(self, cycle: Any) -> None:
        """uvicorn's own way of ending a request whose client left: its app's receive()
        says disconnect and its sends are dropped. If it is queued, it stays queued (its
        app starts, and ends at once): the answers before it are due first."""
        cycle.disconnected = True
        cycle.message_event.set()

    def _close_after(self, reply: bytes) -> None:
        """Write `reply` and close; after the response in flight, if one is (pipelining)."""
        if self._response_pending():
            self._guard_refusal = reply
            self.flow.pause_reading()  # nothing more is read or parsed meanwhile
        else:
            self._write_and_close(reply)

    def _write_and_close(self, reply: bytes) -> None:
        """Write `reply` and close: lingering, as input is still coming (the rest of an
        oversized header or of a bad request, a pipelined request); at once for no reply
        (a silent connection's)."""
        if reply:
            self.transport.write(reply)
            self._linger()
        else:
            _close_now(self.transport)

    def _close_connection(self) -> None:
        """Every close of the connection by uvicorn (the answer to a request that is not
        kept alive, the keep-alive timeout, a drain) comes here: lingering if input is
        still coming, else at once as before."""
        if self._guard_lingering:
            return  # it ends when the client closes, or at the linger's bounds
        transport = self.transport
        if (
            transport.is_closing()
            or transport.get_protocol() is not self  # upgraded: the WebSocket's close
            or not self._input_coming()
        ):
            _close_now(transport)
        else:
            self._linger()

    def _input_coming(self) -> bool:
        """Inside a request (its body, or a pipelined one's headers), bytes held back, or
        bytes in the kernel's receive queue not read yet."""
        if self._guard_phase != _IDLE or self._guard_held:
            return True
        sock = self.transport.get_extra_info("socket")
        if _INQ is None or sock is None:
            return False
        try:
            queued = fcntl.ioctl(sock.fileno(), _INQ, b"\0\0\0\0")
        except (OSError, ValueError):  # closed meanwhile
            return False
        return int.from_bytes(queued, sys.byteorder, signed=True) > 0

    def _linger(self) -> None:
        """Close after what was written, nginx's lingering close: a FIN, and what the client
        still sends is read and dropped until it closes too (eof_received: the transport
        closes), for at most `header_read_timeout_s` and `linger_max_bytes`. Closing at once
        would reset the connection, and a reset drops what the kernel has not sent yet: the
        answer."""
        transport = self.transport
        if not transport.can_write_eof():
            _close_now(transport)
            return
        transport.flush()  # nothing held back (write_coalescing) behind the FIN
        transport.write_eof()  # after what the transport still buffers
        self._guard_lingering = True
        self._guard_linger_left = self.linger_max_bytes
        self._guard_armed = self._guard_discarding = False
        self._drop_held()  # what was held back is dropped with the rest,
        self.pipeline.clear()  # and so are requests queued, never to be answered
        self.flow.resume_reading()
        self._guard_deadlines.arm(self, self._linger_expired)  # replaces any other

    def _drop_lingering(self, dropped: int) -> None:
        self._guard_linger_left -= dropped
        if self._guard_linger_left < 0:  # a client that sends on and never reads
            self._linger_expired()

    def _linger_expired(self) -> None:  # called by the sweep, or past the byte bound
        self._guard_deadlines.disarm(self)
        _close_now(self.transport)


def guarded_protocol(timeout_s: float, max_header_bytes: int) -> type[HeaderGuardProtocol]:
    """HeaderGuardProtocol bounded by `timeout_s` (request headers, lingering closes) and
    `max_header_bytes`; a write stalled by its client by PODSERVE_BODY_READ_TIMEOUT_S, and a
    lingering close by twice PODSERVE_MAX_BODY_BYTES (the rest of any body the server takes
    and as much again of one it refuses)."""
    settings = get_settings()
    bounds = {
        "header_read_timeout_s": timeout_s,
        "max_header_bytes": max_header_bytes,
        "write_stall_s": settings.body_read_timeout_s,
        "linger_max_bytes": 2 * settings.max_body_bytes,
    }
    return type("HeaderGuardProtocol", (HeaderGuardProtocol,), bounds)
