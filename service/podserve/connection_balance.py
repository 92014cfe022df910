"""Keep-alive connections held evenly by a pod's workers.

Each worker has its own SO_REUSEPORT socket, and the kernel picks the socket of a *new*
connection by a hash of its addresses. A few dozen long-lived keep-alive connections (a load
balancer's pool, a Locust run) therefore split binomially, not evenly: 32 connections on 2
workers, 10 runs measured, were never 16/16 and twice 11/21. The busier worker's clients wait
longer, and with few connections one worker can idle beside a busy one (MiniLM, 8 clients:
the worst unbalanced rounds ran at ~305 req/s, balanced ones at 355-444; docs/performance.md).

Each worker publishes how many connections it holds in its slot of a small table in shared
memory, which the Gunicorn master maps before it forks the workers and hands out slot by
slot (`gunicorn_hooks`). A worker that holds more than its fair share, ceil(total / workers),
answers its next request with `Connection: close`: the response is complete, the client
opens a new connection (RFC 9112, 9.6), and the kernel hashes that one afresh, to any worker.
The share counts every open connection (a closed one comes back as a new connection); a
worker's own connections already told to close do not count against it, so it never closes
more than its surplus at once, and a worker at or under its share never closes any: the
split converges within a few requests per connection and then nothing more is closed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
from typing import Any

log = logging.getLogger(__name__)

FREE = -1  # a slot no worker owns
NOT_SERVING = -2  # a worker still starting (loading models) or draining: not in the share


class ConnectionTable:
    """Per-worker connection counts in anonymous shared memory (inherited across fork).

    Each slot has a single writer (its worker; the master when it hands the slot out or
    takes it back), and an aligned 4-byte store is never seen half-written, so no lock.
    """

    def __init__(self, slots: int) -> None:
        self._memory = mmap.mmap(-1, 4 * slots)  # MAP_SHARED | MAP_ANONYMOUS
        self._counts = memoryview(self._memory).cast("i")
        for slot in range(slots):
            self._counts[slot] = FREE

    def claim(self) -> int | None:
        """Master side: a free slot for the worker about to be forked (None: table full)."""
        for slot, count in enumerate(self._counts):
            if count == FREE:
                self._counts[slot] = NOT_SERVING
                return slot
        return None

    def release(self, slot: int) -> None:
        self._counts[slot] = FREE

    def publish(self, slot: int, count: int) -> None:
        self._counts[slot] = count

    def fair_share(self) -> int | None:
        """ceil(serving workers' connections / serving workers); None with fewer than 2.

        A starting worker does not count: connections sent its way would wait for its models.
        """
        live = [count for count in self._counts if count >= 0]
        if len(live) < 2:
            return None
        return math.ceil(sum(live) / len(live))


class ConnectionBalancer:
    """One worker's side: count its connections and decide which ones to close."""

    def __init__(self, table: ConnectionTable, slot: int, enabled: bool = True) -> None:
        self.table = table
        self.slot = slot
        self.enabled = enabled  # off: count connections (metrics), never close one
        self.open = 0
        self.closing = 0  # told to close, not closed yet
        self.closed_for_balance = 0
        self.serving = False  # in the share only from start-up's end to the drain's start

    @property
    def staying(self) -> int:
        """Connections not told to close: what this worker will hold once those are gone."""
        return self.open - self.closing

    def set_serving(self, serving: bool) -> None:
        self.serving = serving
        self._publish()

    def opened(self) -> None:
        self.open += 1
        self._publish()

    def lost(self, was_closing: bool) -> None:
        self.open -= 1
        self.closing -= int(was_closing)
        self._publish()

    def _publish(self) -> None:
        self.table.publish(self.slot, self.open if self.serving else NOT_SERVING)

    def should_close(self) -> bool:
        share = self.table.fair_share() if self.enabled and self.serving else None
        if share is None or self.staying <= share:
            return False
        self.closing += 1
        self.closed_for_balance += 1
        return True


def balanced_protocol(base: type[asyncio.Protocol], balancer: ConnectionBalancer) -> type:
    """uvicorn's httptools protocol class, counting its connections and closing surplus ones."""
    parent: Any = base

    class BalancedProtocol(parent):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._balance_closing = False
            self._balance_counted = True
            balancer.opened()
            super().connection_made(transport)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle  # this request's (pipelined ones too: the newest cycle)
            if cycle is None or cycle.response_complete:  # an upgrade: no cycle was made
                return
            if not self._balance_closing and cycle.keep_alive and balancer.should_close():
                self._balance_closing = True
                cycle.keep_alive = False  # uvicorn: `connection: close`, close once answered

        def handle_websocket_upgrade(self) -> None:
            super().handle_websocket_upgrade()
            self._balance_leave()  # the WebSocket protocol owns the connection now

        def connection_lost(self, exc: Exception | None) -> None:
            self._balance_leave()
            super().connection_lost(exc)

        def _balance_leave(self) -> None:
            if self._balance_counted:
                self._balance_counted = False
                balancer.lost(self._balance_closing)

    return BalancedProtocol


# --- process-wide state ----------------------------------------------------------------------
_table: ConnectionTable | None = None  # mapped by the Gunicorn master, inherited by workers
_balancer: ConnectionBalancer | None = None  # this worker's, once it serves


def install(base: type[asyncio.Protocol], slot: int, enabled: bool) -> type | None:
    """In a worker after fork: its balancer and protocol class; None outside Gunicorn."""
    global _balancer
    if _table is None:
        return None
    _balancer = ConnectionBalancer(_table, slot, enabled)
    return balanced_protocol(base, _balancer)


def set_serving(serving: bool) -> None:
    """Worker: start-up done (count me in the share) or draining begun (count me out)."""
    if _balancer is not None:
        _balancer.set_serving(serving)


def active_balancer() -> ConnectionBalancer | None:
    """This worker's balancer (metrics read its counts); None outside Gunicorn."""
    return _balancer


def gunicorn_hooks(workers: int) -> dict[str, Any]:
    """pre_fork hands each worker a slot (worker.podserve_slot); child_exit takes it back.

    Room for 4x the workers + 4: a reload (HUP) starts the new workers before the old ones
    exit, and TTIN adds workers one by one; a worker beyond that serves without balancing.
    """

    def on_starting(_server: Any) -> None:
        global _table
        _table = ConnectionTable(4 * workers + 4)

    def pre_fork(_server: Any, worker: Any) -> None:
        if _table is None:
            return
        worker.podserve_slot = _table.claim()
        if worker.podserve_slot is None:  # far more workers than at start (TTIN signals)
            log.warning("connection table full: a worker serves without balancing")

    def child_exit(_server: Any, worker: Any) -> None:
        slot = getattr(worker, "podserve_slot", None)
        if _table is not None and slot is not None:
            _table.release(slot)

    return {"on_starting": on_starting, "pre_fork": pre_fork, "child_exit": child_exit}
