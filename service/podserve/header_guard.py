"""Bounds on reading request headers: a slow drip of headers must not hold a connection forever.

uvicorn (0.54, httptools and h11 alike) starts no timer before a request's headers are
complete: a client that connects and sends nothing, or drips header bytes, keeps its socket
and memory for ever, and httptools buffers a header of any size. There is no uvicorn or
Gunicorn setting for this, so the worker uses the protocol class below (uvicorn accepts a
class for its `http` option). Like nginx's `client_header_timeout`: the headers of a request
must be complete within PODSERVE_HEADER_READ_TIMEOUT_S of its first byte (or of the
connection), and within PODSERVE_MAX_HEADER_BYTES, else 408 / 431 and the connection closes.
The deadlines are checked by a sweep (deadline_sweep.py), not a timer per request.
Idle keep-alive connections between requests stay governed by PODSERVE_KEEPALIVE_S; a slow
*body* is bounded by PODSERVE_BODY_READ_TIMEOUT_S in the route (408).
"""

from __future__ import annotations

import asyncio
from typing import Any

from podserve import log_control
from podserve.deadline_sweep import sweep_for
from podserve.write_coalescing import CoalescingTransport

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def _auto_protocol() -> type[asyncio.Protocol]:
    """The class uvicorn's `http="auto"` would pick: httptools if installed, else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    return HttpToolsProtocol


def _reply(status: int, message: str) -> bytes:
    body = b'{"error":"' + message.encode("ascii") + b'"}'
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


def guarded_protocol(
    timeout_s: float, max_header_bytes: int, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a deadline and a size bound on request headers."""
    parent: Any = base or _auto_protocol()

    class HeaderGuardProtocol(parent):  # type: ignore[misc, valid-type]
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
            self._guard_deadlines = sweep_for(self.loop, timeout_s)
            self._guard_armed = False
            self._guard_cycle: Any = None
            self._guard_bytes = 0
            self._arm()  # the first request's headers are due from the connect on

        def data_received(self, data: bytes) -> None:
            if not self._guard_armed and self._between_requests():
                self._arm()  # first byte of the next request on a keep-alive connection
            if self._guard_armed:
                self._guard_bytes += self._header_part(data)
                if self._guard_bytes > max_header_bytes:  # before parsing: in one burst too
                    if not self.transport.is_closing():
                        self._refuse(431, f"request headers exceed {max_header_bytes} bytes")
                    return
            super().data_received(data)
            if not self._guard_armed:
                return
            if self.cycle is not self._guard_cycle or self.transport.get_protocol() is not self:
                self._disarm()  # headers complete (a new cycle), or upgraded to another protocol

        def _header_part(self, data: bytes) -> int:
            """How many bytes of data belong to the headers (the body's are not counted)."""
            tail, self._guard_tail = self._guard_tail, (self._guard_tail + data[-3:])[-3:]
            end = (tail + data).find(b"\r\n\r\n")  # the blank line may straddle two chunks
            return len(data) if end < 0 else max(0, end + 4 - len(tail))

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._guard_cycle = self.cycle
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
            if self._guard_bytes == 0:
                self.transport.close()  # never sent a byte: close quietly, as nginx does
            else:
                self._refuse(408, f"request headers not received within {timeout_s:g} s")

        def _refuse(self, status: int, message: str) -> None:
            self._disarm()
            self.transport.write(_reply(status, message))
            self.transport.close()

    return HeaderGuardProtocol
