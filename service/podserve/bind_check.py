"""Refuse to start on a TCP address that another process already listens on.

Each worker binds a socket of its own with SO_REUSEPORT (worker.py), and the kernel lets
any process of the same user join such a group. So a second podserve started on a busy
port would come up without an error and silently take about half of the first one's new
connections; and on a port held by a program without SO_REUSEPORT every worker would fail
its bind, exit and be forked again, forever. The master holds no socket of its own that
could fail, so before it forks it binds each TCP address once without SO_REUSEPORT, as a
plain listener would, and stops with a clear error if that address is in use. (A lone
worker serves the master's own socket, without SO_REUSEPORT; the check then only makes
Gunicorn's own failure, after 5 s of retries, quick and clear.)
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from collections.abc import Iterable
from typing import Any

from gunicorn.util import is_ipv6


def busy_addresses(addresses: Iterable[Any]) -> list[str]:
    """The (host, port) addresses that cannot be bound because something listens there.

    Unix socket paths and inherited file descriptors are not SO_REUSEPORT groups: skipped.
    Other bind errors (an address not on this host) are left to the workers' own bind,
    which reports them as Gunicorn does.
    """
    busy = []
    for address in addresses:
        if not isinstance(address, tuple):
            continue
        host, port = address[0], address[1]
        if _in_use(host, port):
            busy.append(host_port(host, port))
    return busy


def _in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if is_ipv6(host) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As Gunicorn's own sockets: a port whose old connections linger in TIME_WAIT
            # is free, one with a listener is not (Linux refuses that bind even so).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:  # no IPv6 on this host, say: Gunicorn's bind reports it
        return exc.errno == errno.EADDRINUSE
    return False


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets (as Gunicorn's bind setting takes it)."""
    return f"[{host}]:{port}" if is_ipv6(host) else f"{host}:{port}"


def on_starting(server: Any) -> None:
    """Gunicorn hook, in the master before it forks: exit 1 if a bind address is taken."""
    if server.cfg.reuse_port:
        # Gunicorn's error logger; its empty line comes right after this hook.
        logging.getLogger("gunicorn.error").addFilter(_NoEmptyListenerLine())
    if server.master_pid or "LISTEN_FDS" in os.environ:
        # A USR2 re-exec shares the port with the old master's workers on purpose; under
        # systemd socket activation the port is held by systemd, for podserve.
        return
    busy = busy_addresses(server.cfg.address)
    if busy:
        server.log.error(
            "address already in use: %s; another process listens there (a second podserve "
            "would silently share its connections): stop it or set PODSERVE_PORT",
            ", ".join(busy),
        )
        sys.exit(1)


class _NoEmptyListenerLine(logging.Filter):
    """Drops Gunicorn's "Listening at:  (pid)": with reuse_port the master holds no
    listener, and that line, empty, read as if the server listened nowhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            record.msg == _GUNICORN_LISTENING and isinstance(args, tuple) and args[:1] == ("",)
        )


_GUNICORN_LISTENING = "Listening at: %s (%s)"


def when_ready(server: Any) -> None:
    """Gunicorn logs its master's listeners, which are none with reuse_port: say where."""
    if not server.cfg.reuse_port:
        return
    urls = [f"http://{host_port(*a[:2])}" for a in server.cfg.address if isinstance(a, tuple)]
    server.log.info("Listening at: %s (a SO_REUSEPORT socket per worker slot)", ", ".join(urls))


def gunicorn_hooks() -> dict[str, Any]:
    return {"on_starting": on_starting, "when_ready": when_ready}
