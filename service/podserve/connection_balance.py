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

The same table staggers worker recycling (PODSERVE_MAX_REQUESTS): a worker that reaches its
limit stops accepting, and all new connections go to the others, which then reach theirs
sooner (its slot's socket stays open, and they serve it: slot_listeners.py). Measured with
2 workers and clients that connect per request: both recycled within 4-35 ms of each other
every time, and the port had no listener at all until the replacements bound theirs (~1,000
refused connections in 15 s, 12 recycles). So a worker
leaves for recycling only while every other worker is serving (`leave_for_recycle`); the
replacement is not serving until its models are loaded, so recycles go one at a time.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import mmap
import os
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
        # Serialises leave_for_recycle only: check-then-leave must not interleave. A POSIX
        # record lock on an anonymous memory file: per process, so it excludes forked
        # workers from each other, and unlike a semaphore it creates nothing in /dev/shm.
        self._recycle_lock = os.memfd_create("podserve-recycle-lock")
        self._held: list[int] = []  # master only: slots kept for replacements (claimed first)

    def claim(self) -> int | None:
        """Master side: a slot for the worker about to be forked (None: table full).

        A slot held for a replacement (`hold_for_replacement`) goes first.
        """
        if self._held:
            return self._held.pop(0)
        for slot, count in enumerate(self._counts):
            if count == FREE:
                self._counts[slot] = NOT_SERVING
                return slot
        return None

    def release(self, slot: int) -> None:
        self._counts[slot] = FREE

    def hold_for_replacement(self, slot: int) -> None:
        """Master side: an exited worker's slot stays NOT_SERVING until its replacement
        claims it. Freed at once, it would leave a moment (reaped, not yet re-forked) in
        which no worker is starting, and a worker waiting to recycle would close its socket
        while the exited one's replacement has none yet: no listener, connections refused.
        """
        self._counts[slot] = NOT_SERVING
        self._held.append(slot)

    @property
    def slots(self) -> int:
        return len(self._counts)

    @property
    def held(self) -> int:
        return len(self._held)

    def keep_held(self, replacements: int) -> None:
        """Master side: free held slots beyond the replacements still to be forked."""
        while len(self._held) > max(0, replacements):
            self.release(self._held.pop())

    def count(self, slot: int) -> int:
        """A slot's connections, or FREE / NOT_SERVING."""
        return self._counts[slot]

    def publish(self, slot: int, count: int) -> None:
        self._counts[slot] = count

    def leave_for_recycle(self, slot: int) -> bool:
        """Worker side: leave the share to recycle, unless another worker is not serving.

        Not serving means starting (its models still loading) or draining; a slot freed by an
        exited worker is FREE. A worker alone in the table always may leave.
        """
        try:
            fcntl.lockf(self._recycle_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another worker is deciding right now: ask again next tick
        try:
            others = [count for index, count in enumerate(self._counts) if index != slot]
            if NOT_SERVING in others:
                return False
            self._counts[slot] = NOT_SERVING
            return True
        finally:
            fcntl.lockf(self._recycle_lock, fcntl.LOCK_UN)

    def fair_share(self, stalled: frozenset[int] = frozenset()) -> int | None:
        """ceil(serving workers' connections / serving workers); None with fewer than 2.

        A starting worker does not count: connections sent its way would wait for its models.
        Nor does a stalled one (slot_listeners): the others take its new connections, and
        measured against its share they would close them, over and over, until it runs.
        """
        counts = self._counts
        if stalled:
            counts = [count for slot, count in enumerate(counts) if slot not in stalled]
        live = [count for count in counts if count >= 0]
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
        self.stalled: frozenset[int] = frozenset()  # slots of stalled workers (slot_listeners)
        self.stalls_seen = 0  # other workers seen stalling (metrics)

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

    def leave_for_recycle(self) -> bool:
        if self.table.leave_for_recycle(self.slot):
            self.serving = False
            return True
        return False

    def should_close(self) -> bool:
        share = self.table.fair_share(self.stalled) if self.enabled and self.serving else None
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
                # uvicorn: `connection: close`, close once answered (lingering, if the
                # body is not read yet: header_guard)
                cycle.keep_alive = False

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


def own_slot() -> int | None:
    """This worker's slot (0 .. workers-1, reused by its replacement); None outside Gunicorn
    or where the balancer is not installed."""
    return _balancer.slot if _balancer is not None else None


def set_serving(serving: bool) -> None:
    """Worker: start-up done (count me in the share) or draining begun (count me out)."""
    if _balancer is not None:
        _balancer.set_serving(serving)


def set_stalled(slots: frozenset[int]) -> None:
    """Worker: the slots whose workers have stalled, out of the share until they run."""
    if _balancer is not None:
        _balancer.stalls_seen += len(slots - _balancer.stalled)
        _balancer.stalled = slots


def leave_for_recycle() -> bool:
    """Worker at its request limit: may it recycle now? (Always outside Gunicorn.)"""
    return _balancer is None or _balancer.leave_for_recycle()


def table() -> ConnectionTable | None:
    """The pod's table (mapped by the master, inherited by workers); None outside Gunicorn."""
    return _table


def active_balancer() -> ConnectionBalancer | None:
    """This worker's balancer (metrics read its counts); None outside Gunicorn."""
    return _balancer


def gunicorn_hooks(workers: int) -> dict[str, Any]:
    """pre_fork hands each worker a slot (worker.podserve_slot); child_exit takes it back,
    or holds it for the replacement Gunicorn is about to fork.

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

    def child_exit(server: Any, worker: Any) -> None:
        slot = getattr(worker, "podserve_slot", None)
        if _table is None or slot is None:
            return
        # Gunicorn has dropped the worker from server.WORKERS; fewer than num_workers left
        # means its main loop forks a replacement next (not so after a reload's or a TTOU's
        # deliberate stop, where the others already make up the count).
        if _table.held < server.num_workers - len(server.WORKERS):
            _table.hold_for_replacement(slot)
        else:
            _table.release(slot)

    def nworkers_changed(server: Any, new_value: int, _old_value: int | None) -> None:
        # A TTOU handled after a worker's exit in the same batch of signals: that worker's
        # slot was held, and no replacement comes. Left held, it would block every recycle.
        if _table is not None:
            _table.keep_held(new_value - len(server.WORKERS))

    return {
        "on_starting": on_starting,
        "pre_fork": pre_fork,
        "child_exit": child_exit,
        "nworkers_changed": nworkers_changed,
    }
