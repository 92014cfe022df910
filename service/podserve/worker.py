"""Gunicorn worker: UvicornWorker that drains on SIGTERM and finishes before the SIGKILL.

Load spreading: with one shared listening socket, keep-alive connections pile onto
whichever worker accepts first (measured: 99.9% / 0.1% CPU split at concurrency 8).
Gunicorn >= 23 with `reuse_port` gives each worker its own SO_REUSEPORT socket, created
after fork, so the kernel spreads new connections by a hash; gunicorn_conf turns it on.
The hash splits a few keep-alive connections unevenly; connection_balance.py evens them
out. tests/test_under_load.py checks the split.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from types import FrameType
from typing import Any

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from podserve import connection_balance, lifecycle
from podserve.header_guard import guarded_protocol
from podserve.settings import get_settings


class DrainingServer(Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:  # models loaded, sockets served: take a share of connections
            connection_balance.set_serving(True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        lifecycle.begin_draining()  # readiness says no at once
        connection_balance.set_serving(False)
        super().handle_exit(sig, frame)


class PodserveWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "auto", "http": "auto"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Finish in-flight requests and run lifespan shutdown (log flush) before the
        # arbiter's SIGKILL at graceful_timeout.
        self.config.timeout_graceful_shutdown = max(1, int(self.cfg.graceful_timeout) - 2)
        # Bound the reading of request headers (uvicorn has no setting for it).
        settings = get_settings()
        # The inference thread runs Python between ORT calls (tokenizer, pooling, splits);
        # the loop thread waits up to the switch interval for the GIL (CPython: 5 ms), which
        # would show up in every awaited I/O call. A short interval bounds that wait.
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        self.config.http = guarded_protocol(
            settings.header_read_timeout_s, settings.max_header_bytes
        )

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
        self._install_sigquit_handler()
        try:
            await server.serve(sockets=self.sockets)
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
        if slot is None or not hasattr(base, "on_headers_complete"):  # h11: no per-request hook
            return
        balanced = connection_balance.install(base, slot, get_settings().balance_connections)
        if balanced is not None:
            self.config.http = balanced


def _exit_boot_error() -> None:
    logging.shutdown()
    sys.stderr.flush()
    os._exit(Arbiter.WORKER_BOOT_ERROR)
