"""Process-wide lifecycle flags: set from the signal handler, read by the health routes."""

from __future__ import annotations

import threading

_draining = threading.Event()


def begin_draining() -> None:
    """SIGTERM arrived: readiness must say no at once, while in-flight work finishes."""
    _draining.set()


def is_draining() -> bool:
    return _draining.is_set()
