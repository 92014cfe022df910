"""Process-wide lifecycle flags: set from the signal handler, read by the health routes.

A plain flag, not a threading.Event: the handler runs between two bytecodes of the main
thread, also inside an earlier run of itself (Gunicorn sends SIGTERM again on each pass of
its loop while a worker it stopped is still alive), and Event.set() takes a lock that a
nested call would then wait on for ever: the worker hung until the master killed it.
"""

from __future__ import annotations

_draining = False


def begin_draining() -> None:
    """SIGTERM arrived: readiness must say no at once, while in-flight work finishes."""
    global _draining
    _draining = True


def is_draining() -> bool:
    return _draining
