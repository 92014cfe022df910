"""Log settings changed at run time, for the whole pod: Triton's logging extension.

`POST /v2/logging` reaches one worker, but the setting is the pod's: the new level and
access-log switch go into a few words of shared memory that the Gunicorn master maps before
it forks (as the connection table), and every worker looks at them twice a second. A worker
started later (a recycle, a crash) takes the pod's current setting, not the environment's.
Without the master (the app run in-process) the state is the process's own.

podserve's levels are thresholds (Python logging), not Triton's independent switches: info
on means warning and error on too. A request is applied field by field (true lowers the
threshold to that level, false raises it just above), then every field it named must hold,
else it contradicts itself and is refused. `log_verbose_level` >= 1 is DEBUG.
`access_log`, podserve's own addition, writes one line per response, on connections already
open too (the protocol reads the switch per request: header_guard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Any

from podserve.errors import BadRequest

FOLLOW_INTERVAL_S = 0.5
LOG_FORMAT = "json"  # the only one: JSON lines on stderr (logs.py)
ACCESS_LOGGERS = ("uvicorn.access", "gunicorn.access")
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "gunicorn.error")

# Triton's switches and the threshold each one stands for, most verbose first.
_SWITCHES = (
    ("log_verbose_level", logging.DEBUG),
    ("log_info", logging.INFO),
    ("log_warning", logging.WARNING),
    ("log_error", logging.ERROR),
)
_ABOVE = {logging.DEBUG: logging.INFO, logging.INFO: logging.WARNING,
          logging.WARNING: logging.ERROR, logging.ERROR: logging.CRITICAL}  # fmt: skip
KNOWN_FIELDS = ("log_file", *(name for name, _ in _SWITCHES), "log_format", "access_log")


@dataclass(frozen=True)
class LogSettings:
    level: int  # the root logger's threshold
    access_log: bool

    def as_triton(self) -> dict[str, Any]:
        return {
            "log_file": "",
            "log_info": self.level <= logging.INFO,
            "log_warning": self.level <= logging.WARNING,
            "log_error": self.level <= logging.ERROR,
            "log_verbose_level": 1 if self.level <= logging.DEBUG else 0,
            "log_format": LOG_FORMAT,
            "access_log": self.access_log,
        }

    def updated(self, request: Any) -> LogSettings:
        """The settings after a POST body, or BadRequest saying what is wrong with it."""
        if not isinstance(request, dict):
            raise BadRequest("log settings must be a JSON object")
        unknown = sorted(set(request) - set(KNOWN_FIELDS))
        if unknown:
            raise BadRequest(f"unknown log settings {unknown}; known: {list(KNOWN_FIELDS)}")
        _check_fixed(request)
        wanted = {name: _switch(request, name) for name, _ in _SWITCHES if name in request}
        level = self.level
        for name, threshold in _SWITCHES:
            if name in wanted:
                level = min(level, threshold) if wanted[name] else max(level, _ABOVE[threshold])
        result = LogSettings(level, _bool(request, "access_log", self.access_log))
        shown = result.as_triton()
        clashes = [name for name, on in wanted.items() if bool(shown[name]) != on]
        if clashes:
            raise BadRequest(
                f"log settings {sorted(wanted)} contradict each other: podserve's levels are "
                "thresholds (verbose shows info, info shows warning, warning shows error)"
            )
        return result


def _check_fixed(request: dict[str, Any]) -> None:
    if request.get("log_file", "") != "":
        raise BadRequest("log_file must be empty: podserve logs to stderr, for the container "
                         "runtime to collect")  # fmt: skip
    if request.get("log_format", LOG_FORMAT) != LOG_FORMAT:
        raise BadRequest(f"log_format must be {LOG_FORMAT!r}: podserve writes JSON lines only")


def _switch(request: dict[str, Any], name: str) -> bool:
    value = request[name]
    if name != "log_verbose_level":
        return _bool(request, name, False)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"log_verbose_level must be a non-negative integer, not {value!r}")
    return value > 0


def _bool(request: dict[str, Any], name: str, default: bool) -> bool:
    value = request.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, not {value!r}")
    return value


class SharedLogState:
    """[generation, level, access_log] in anonymous shared memory, inherited across fork.

    Writers (a worker answering a POST) hold a record lock on a memory file, so two POSTs
    in two workers never interleave; the generation is stored last, so a reader that sees
    it move reads the fields written before it.
    """

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, 12)  # MAP_SHARED | MAP_ANONYMOUS
        self._words = memoryview(self._memory).cast("i")
        self._lock = os.memfd_create("podserve-log-settings-lock")

    def read(self) -> tuple[int, LogSettings]:
        generation = self._words[0]
        return generation, LogSettings(self._words[1], bool(self._words[2]))

    def write(self, settings: LogSettings) -> int:
        fcntl.lockf(self._lock, fcntl.LOCK_EX)
        try:
            self._words[1], self._words[2] = settings.level, int(settings.access_log)
            self._words[0] += 1
            return self._words[0]
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)


_shared: SharedLogState | None = None  # the pod's (mapped by the master) or this process's
_applied = LogSettings(logging.INFO, False)
_applied_generation = 0


def from_settings(level_name: str, access_log: bool) -> LogSettings:
    """The start-up setting (PODSERVE_LOG_LEVEL, PODSERVE_ACCESS_LOG)."""
    level = logging.getLevelNamesMapping().get(level_name.upper())
    if level is None:
        raise ValueError(f"unknown log level {level_name!r}")
    return LogSettings(level, access_log)


def shared_state() -> SharedLogState:
    global _shared
    if _shared is None:
        _shared = SharedLogState()
    return _shared


def current() -> LogSettings:
    return _applied


def access_log_enabled() -> bool:
    """Read per request by the HTTP protocol (header_guard.py): a switch, not a lookup."""
    return _applied.access_log


def apply(settings: LogSettings, generation: int | None = None) -> None:
    """Set this process's loggers; `generation` is the shared state's, once followed."""
    global _applied, _applied_generation
    logging.getLogger().setLevel(settings.level)
    for name in SERVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)  # the root's threshold decides
    for name in ACCESS_LOGGERS:  # their lines are INFO: kept whatever the threshold when on
        access = logging.getLogger(name)
        access.setLevel(logging.INFO if settings.access_log else logging.NOTSET)
        access.propagate = settings.access_log
    _applied = settings
    if generation is not None:
        _applied_generation = generation


def change(request: Any) -> LogSettings:
    """A POST body: validate, publish to the pod, apply here at once."""
    settings = _applied.updated(request)
    apply(settings, shared_state().write(settings))
    return settings


def follow() -> None:
    """Adopt the pod's setting if another worker changed it (or changed it before we began)."""
    generation, settings = shared_state().read()
    if generation != _applied_generation:
        apply(settings, generation)


async def follow_forever() -> None:
    while True:
        follow()
        await asyncio.sleep(FOLLOW_INTERVAL_S)


class Follower:
    """The worker's follow task, started and stopped with the app's lifespan."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(follow_forever(), name="log-settings")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def gunicorn_hooks() -> dict[str, Any]:
    """on_starting: the master maps the shared state, so every worker it forks shares it."""

    def on_starting(_server: Any) -> None:
        shared_state()

    return {"on_starting": on_starting}
