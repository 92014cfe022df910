"""Gunicorn worker: UvicornWorker that drains on SIGTERM and finishes before the SIGKILL.

Load spreading: with one shared listening socket, keep-alive connections pile onto
whichever worker accepts first (measured: 99.9% / 0.1% CPU split at concurrency 8).
Gunicorn >= 23 with `reuse_port` gives each worker its own SO_REUSEPORT socket, created
after fork, so the kernel spreads new connections by a hash; gunicorn_conf turns it on for
2 or more workers, and slot_listeners.py has the master keep each worker slot's socket, so
that no listener closes when a worker is replaced. The hash splits a few keep-alive
connections unevenly; connection_balance.py evens them out. tests/test_under_load.py
checks the split.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.config import Config
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from podserve import connection_balance, drain_grace, lifecycle, slot_listeners
from podserve.client_disconnect import disconnect_watch_protocol
from podserve.header_guard import guarded_protocol
from podserve.settings import get_settings

logger = logging.getLogger(__name__)


class DrainingServer(Server):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        # The request limit (PODSERVE_MAX_REQUESTS, jittered by Gunicorn) is checked here, not
        # by uvicorn, so that workers recycle one at a time (connection_balance).
        self.recycle_after: int | None = config.limit_max_requests
        config.limit_max_requests = None
        self.recycle_deferred_since: float | None = None
        # A worker stuck starting must not keep a leaking one alive for ever.
        self.recycle_max_wait_s = get_settings().recycle_max_wait_s
        self.slot: int | None = None  # this worker's slot (connection_balance), if any
        self.cover: slot_listeners.Cover | None = None
        # How long a draining worker tells the master it is alive: its drain, its lifespan
        # shutdown and its exit fit in the graceful timeout; one stuck longer is left to the
        # master's worker timeout.
        self.drain_heartbeat_s = get_settings().graceful_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.cover is not None:
            await self.cover.tick()
        return await super().on_tick(counter) or self._recycle_now()

    def _recycle_now(self) -> bool:
        if self.recycle_after is None or self.server_state.total_requests < self.recycle_after:
            return False
        now = time.monotonic()
        if connection_balance.leave_for_recycle():
            reason = "recycling"
        elif self.recycle_deferred_since is None:
            self.recycle_deferred_since = now
            logger.info("request limit reached; recycling waits for the other workers to serve")
            return False
        elif now - self.recycle_deferred_since > self.recycle_max_wait_s:
            connection_balance.set_serving(False)
            reason = f"recycling after waiting {self.recycle_max_wait_s:.0f} s for other workers"
        else:
            return False
        logger.info("Maximum request limit of %d exceeded: %s", self.recycle_after, reason)
        return True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Models load in a thread (the loop is free), for longer than the worker timeout if
        # they are large or many; uvicorn's own heartbeat starts only once it serves.
        heartbeat = asyncio.create_task(self._heartbeat(for_s=None))
        try:
            async with slot_listeners.starting():
                await super().startup(sockets=sockets)
        finally:
            heartbeat.cancel()
        if not self.should_exit:  # models loaded, sockets served: take a share of connections
            # The cover first: it records this worker's first tick, which the others must
            # see before its count, or they take it for stalled.
            self.cover = slot_listeners.cover(
                self.slot, self._new_protocol, self.config.backlog, get_settings().loop_stall_s
            )
            connection_balance.set_serving(True)

    def _new_protocol(self) -> asyncio.Protocol:
        """A connection's protocol, as uvicorn makes them for its own listeners."""
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(for_s=self.drain_heartbeat_s))
        try:
            if self.cover is not None:
                self.cover.close()  # the slots covered stay open: other workers serve them
            slot_listeners.close_others(self.slot)
            drain_grace.begin_worker_drain()
            await super().shutdown(sockets=sockets)
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, for_s: float | None) -> None:
        """Tell the master this worker is alive, for `for_s` seconds (None: until cancelled).

        uvicorn tells it (callback_notify) only from main_loop's on_tick: not yet while the
        models load, and no more once the drain begins. The master goes on checking a worker
        that drains for a recycle, a reload (HUP) or a TTOU, and killed one whose drain
        outlasted about half of PODSERVE_WORKER_TIMEOUT_S ("WORKER TIMEOUT", SIGABRT),
        dropping its requests. While a worker starts, only Gunicorn 27's comparison of a
        monotonic time with the heartbeat file's first, wall-clock mtime spared one whose
        models took longer than the worker timeout to load; earlier Gunicorns killed it, and
        it booted again, for ever. A worker whose start-up hangs is left to the startup probe."""
        notify = self.config.callback_notify
        if notify is None:  # not under Gunicorn
            return
        interval = max(0.1, self.config.timeout_notify / 2)  # master's timeout / 4
        deadline = math.inf if for_s is None else time.monotonic() + for_s
        while time.monotonic() < deadline:
            await notify()
            await asyncio.sleep(interval)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn drains on SIGINT and SIGTERM; SIGQUIT too. Gunicorn's quick shutdown (SIGINT
        or SIGQUIT to the master, `kill -INT 1` in a container, Ctrl-C through docker without
        -t) sends the workers SIGQUIT, which uvicorn-worker bound to Gunicorn's handle_exit:
        that sets a flag uvicorn never reads, so the worker served on, ready, until the
        master's SIGKILL at the graceful timeout, and lifespan shutdown never ran."""
        if threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(signal.SIGQUIT, self.handle_exit)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGQUIT, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lifecycle.begin_draining()  # readiness says no at once
        connection_balance.set_serving(False)
        # Every stop signal drains as SIGTERM does. uvicorn's handle_exit takes a second SIGINT
        # for "force quit" (no wait for in-flight requests, no lifespan shutdown), but a worker
        # gets one SIGINT from a terminal's Ctrl-C and SIGQUIT from the master at once; and
        # the signal, recorded, is raised again after the drain, where SIGQUIT's default
        # action would dump core.
        super().handle_exit(signal.SIGTERM, frame)


class PodserveWorker(UvicornWorker):
    # No `server: uvicorn` on every answer: it names the stack to scanners and costs bytes.
    # (uvicorn-worker's own loop/http "auto" are uvicorn's defaults; `http` is set below.)
    CONFIG_KWARGS = {"server_header": False}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        # Finish in-flight requests and run lifespan shutdown (log flush) before the
        # arbiter's SIGKILL at graceful_timeout.
        self.config.timeout_graceful_shutdown = settings.worker_drain_s
        # The inference thread runs Python between ORT calls (tokenizer, pooling, splits);
        # the loop thread waits up to the switch interval for the GIL (CPython: 5 ms), which
        # would show up in every awaited I/O call. A short interval bounds that wait.
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        # Bound the reading of request headers (uvicorn has no setting for it).
        http = guarded_protocol(settings.header_read_timeout_s, settings.max_header_bytes)
        http = drain_grace.drain_grace_protocol(http, settings.drain_idle_grace_s)
        http = disconnect_watch_protocol(http)  # a queued request leaves with its client
        self.config.http = http

    def load_wsgi(self) -> None:
        # create_app failed (e.g. an unreadable API key file): Gunicorn's sys.exit would hang
        # in ORT's exit handlers (state inherited from the master), so halt as _serve does.
        try:
            super().load_wsgi()
        except Exception as exc:
            self.log.exception("Exception in worker process")
            print(exc, file=sys.stderr)
            _exit_boot_error()

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        self._balance_connections()
        server = DrainingServer(config=self.config)
        server.slot = getattr(self, "podserve_slot", None)
        # Not uvicorn-worker's _install_sigquit_handler: the server drains on SIGQUIT
        # (DrainingServer.capture_signals).
        try:
            await server.serve(sockets=_plain_sockets(self.sockets))
        except SystemExit:
            if server.started:
                raise
        if not server.started:
            # Start-up failed (e.g. a model did not load). Skip interpreter teardown: ORT's
            # thread pools abort the process there, and Gunicorn would read SIGABRT as a
            # crash and reboot the worker forever instead of halting with the boot error.
            _exit_boot_error()

    def _balance_connections(self) -> None:
        """After fork: count this worker's connections in its slot, close surplus ones if on."""
        slot, base = getattr(self, "podserve_slot", None), self.config.http
        if slot is None:
            return
        balanced = connection_balance.install(base, slot, get_settings().balance_connections)
        if balanced is not None:
            self.config.http = balanced


def _plain_sockets(listeners: list[Any]) -> list[socket.socket]:
    """The sockets inside Gunicorn's wrappers. uvloop's server.close() closes the fd and then
    calls the object's close(): on a wrapper that closes the same fd number again (EBADF,
    logged as "Error while closing socket" on every drain, or another thread's new fd if
    the number was reused in between); a plain socket it detaches first."""
    return [getattr(listener, "sock", listener) for listener in listeners]


def _exit_boot_error() -> None:
    logging.shutdown()
    sys.stderr.flush()
    os._exit(Arbiter.WORKER_BOOT_ERROR)
