"""A known start-up error in a worker (a model, a config value, a path, the database): one line.

uvicorn logged a failed lifespan start as the traceback starlette formats: 1.5-5.5 KB of
framework frames in one log line's `msg`, the reason on its last line (a bad model config's
ended with pydantic's "For further information visit ..."). An error an operator fixes is
logged once, as its reason, and the traceback is dropped; any other exception is a bug and
keeps its traceback. The boot fails as before (the worker exits, the master with code 3),
also when several workers fail at once (gunicorn_hooks: the master's halt is not cut short).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from podserve.model_repository import ModelLoadError
from podserve.settings import Settings

log = logging.getLogger(__name__)


def is_known(exc: BaseException) -> bool:
    """A bad model, database or configured path: an operator fixes it from its reason. Any
    other exception (a ValueError from a bug, a TimeoutError with no message) keeps its
    traceback: its file and line are what whoever fixes it needs."""
    if isinstance(
        exc, ModelLoadError | asyncpg.PostgresError | asyncpg.ClientConfigurationError
    ):  # no such database, unknown role, wrong password; a bad DSN option
        return True
    return isinstance(exc, OSError) and getattr(exc, "filename", None) is not None


class StartupFailed(RuntimeError):
    """A known start-up error, already logged: QuietStartupFailure drops its traceback."""


def logged(exc: BaseException, settings: Settings) -> StartupFailed:
    """Log `exc` as one line; the exception to raise in its place."""
    text = reason(exc, settings)
    log.error("start-up failed", extra={"error": text, "error_type": type(exc).__name__})
    return StartupFailed(text)


def reason(exc: BaseException, settings: Settings) -> str:
    """The error's message on one line, after the setting it is about where that is known."""
    text = _one_line(exc)
    source = _source(exc, settings)
    return f"{source}: {text}" if source else text


def _one_line(exc: BaseException) -> str:
    """pydantic's errors as `field: message`, without its "For further information" URLs."""
    text = str(exc) or repr(exc)
    for cause in _chain(exc):
        if isinstance(cause, ValidationError):  # quoted whole in the model config's error
            text = text.replace(str(cause), _fields(cause))
    lines = (line.strip() for line in text.splitlines())
    return " ".join(line for line in lines if line and not line.startswith("For further"))


def _source(exc: BaseException, settings: Settings) -> str | None:
    """'database "x" does not exist', "[Errno 17] File exists: './spool'": set where?"""
    if isinstance(exc, asyncpg.PostgresError):
        return "PODSERVE_DATABASE_URL"
    if isinstance(exc, asyncpg.ClientConfigurationError):  # the URL itself passed url_problem
        return "PODSERVE_DATABASE_URL or a PG* environment variable"
    return _path_setting(exc, settings)


def _path_setting(exc: BaseException, settings: Settings) -> str | None:
    """The PODSERVE_* path setting an OSError's file is, or is inside of."""
    filename = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if not isinstance(filename, str | os.PathLike):
        return None
    path = Path(os.path.abspath(filename))
    for name, value in settings:
        if isinstance(value, Path):
            root = Path(os.path.abspath(value))
            if path == root or root in path.parents:
                return f"PODSERVE_{name.upper()}"
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _fields(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, item['loc'])) or 'the config'}: {item['msg']}"
        for item in error.errors(include_url=False)
    )


class QuietStartupFailure:
    """Drops the traceback starlette sends with a StartupFailed (uvicorn would log it).

    Innermost ASGI layer, beside the router: HTTP requests only pass through it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            send = _quiet(send)
        await self.app(scope, receive, send)


def _quiet(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        # Sent from starlette's `except` block: the exception being handled is the failure.
        if message["type"] == "lifespan.startup.failed" and isinstance(
            sys.exception(), StartupFailed
        ):
            message = {"type": message["type"], "message": ""}
        await send(message)

    return wrapped


def _stop_through_boot_errors(server: Any) -> None:
    """The master's stop() reaps the workers as they exit, and Gunicorn's reap_workers raises
    HaltServer for each that exits with a boot error. A halt for the first worker's boot error
    stops the others, which fail to boot too if they have not yet: their HaltServer escaped
    halt() as a second, chained traceback, cutting the rest of stop() short (the SIGKILL of
    stragglers, the last reap, the on_exit hooks), and the master exited 1 instead of 3 (about
    1 start in 2 with 4 workers). While stopping, the halt is already under way with the
    first failure's reason and status: the others are only reaped."""
    from gunicorn.errors import HaltServer

    original_stop = getattr(server, "stop", None)
    original_reap = getattr(server, "reap_workers", None)
    if original_stop is None or original_reap is None:  # not Gunicorn's Arbiter (a test's)
        return

    def reap_workers() -> None:
        while True:  # a raise ends Gunicorn's reaping loop: the next exited worker waits
            try:
                original_reap()
                return
            except HaltServer:
                continue

    def stop(graceful: bool = True) -> None:
        server.reap_workers = reap_workers
        try:
            original_stop(graceful)
        finally:
            server.reap_workers = original_reap

    server.stop = stop


def gunicorn_hooks() -> dict[str, Any]:
    """on_starting (master): several workers failing to boot end in one halt."""
    return {"on_starting": _stop_through_boot_errors}
