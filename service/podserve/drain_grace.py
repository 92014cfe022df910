"""Draining a worker without dropping a request that is already on its way.

When a worker drains (SIGTERM, a reload, a recycle after PODSERVE_MAX_REQUESTS), uvicorn
closes at once every connection with no request in progress. That includes a connection
the worker has just accepted, whose first request is sent but not read yet, and a
keep-alive connection whose client is sending its next request at that moment: the request
is lost and the client sees a reset or an empty reply. Measured with 2 workers recycling
every ~2.4 s under clients that open a connection per request: 13-27 such failures in 15 s.

With the protocol class below such a connection is left open for PODSERVE_DRAIN_IDLE_GRACE_S
more: a request that arrives in that time is answered, with `Connection: close`, and then
the connection is shut down as uvicorn would have done it. uvicorn waits for every
connection to close before it ends the worker, within the graceful timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import Send

_worker_draining = False  # set once this worker stops accepting connections


def begin_worker_drain() -> None:
    """Called just before uvicorn's shutdown. A connection accepted in the loop pass that
    ended the serving loop has its connection_made still queued (call_soon) when shutdown
    walks the open connections, so it would be missed: kept alive, and reset when the
    graceful timeout runs out. It drains from connection_made instead."""
    global _worker_draining
    _worker_draining = True


_CUT_OFF_HEADERS = [
    (b"content-type", b"application/json"),
    (b"retry-after", b"1"),
    (b"connection", b"close"),
]
_CUT_OFF_BODY = orjson.dumps(
    {
        "error": "the server stopped before this request finished: its worker's drain time "
        "(PODSERVE_GRACEFUL_TIMEOUT_S - 2 s) ran out; send it again"
    }
)


async def answer_cut_off(send: Send) -> bool:
    """A request still running when the drain time ends is cancelled by uvicorn, which then
    answers 500 as for a server bug. Answer 503 + Retry-After instead: the client (or a proxy)
    may send it again, to another worker or pod. False when this worker is not draining or
    the response had begun (uvicorn refuses a second start: the connection is closed)."""
    if not _worker_draining:
        return False
    try:
        await send({"type": "http.response.start", "status": 503, "headers": _CUT_OFF_HEADERS})
    except RuntimeError:
        return False
    await send({"type": "http.response.body", "body": _CUT_OFF_BODY})
    return True


def drain_grace_protocol(base: type[asyncio.Protocol], grace_s: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class, with a grace for idle connections when draining."""
    parent: Any = base

    class DrainGraceProtocol(parent):  # type: ignore[misc, valid-type]
        _draining = False  # set on the instance by the first shutdown()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if _worker_draining:
                self.shutdown()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self._draining and self.cycle is not None:
                # Answered, then closed (lingering while input is unread: header_guard):
                # the client goes elsewhere.
                self.cycle.keep_alive = False

        def shutdown(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if self._draining or not idle or grace_s <= 0 or self.transport.is_closing():
                self._draining = True
                super().shutdown()  # as uvicorn: close if idle, else close after the answer
                return
            self._draining = True
            self.loop.call_later(grace_s, self.shutdown)

    return DrainGraceProtocol
