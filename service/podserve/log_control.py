"""Log settings changed at run time, for the whole pod: Triton's logging extension.

`POST /v2/logging` reaches one worker; the level and the access-log switch are the pod's
(pod_settings.py shares them with every worker, including ones started later).

podserve's levels are thresholds (Python logging), not Triton's independent switches: info
on means warning and error on too. A request is applied field by field (true lowers the
threshold to that level, false raises it just above), then every field it named must hold,
else it contradicts itself and is refused. `log_verbose_level` >= 1 is DEBUG.
`access_log`, podserve's own addition, writes one line per response, on connections already
open too (the protocol reads the switch per request: header_guard.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from podserve import pod_settings
from podserve.errors import BadRequest

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
        request = pod_settings.request_fields(request, KNOWN_FIELDS, "log settings")
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


_applied = LogSettings(logging.INFO, False)


def from_settings(level_name: str, access_log: bool) -> LogSettings:
    """The start-up setting (PODSERVE_LOG_LEVEL, PODSERVE_ACCESS_LOG)."""
    level = logging.getLevelNamesMapping().get(level_name.upper())
    if level is None:
        raise ValueError(f"unknown log level {level_name!r}")
    return LogSettings(level, access_log)


def current() -> LogSettings:
    return _applied


def access_log_enabled() -> bool:
    """Read per request by the HTTP protocol (header_guard.py): a switch, not a lookup."""
    return _applied.access_log


def apply(settings: LogSettings) -> None:
    """Set this process's loggers."""
    global _applied
    logging.getLogger().setLevel(settings.level)
    for name in SERVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)  # the root's threshold decides
    for name in ACCESS_LOGGERS:  # their lines are INFO: kept whatever the threshold when on
        access = logging.getLogger(name)
        access.setLevel(logging.INFO if settings.access_log else logging.NOTSET)
        access.propagate = settings.access_log
    _applied = settings


def _decode(values: tuple[int, ...]) -> LogSettings:
    return LogSettings(values[0], bool(values[1]))


def _encode(settings: LogSettings) -> tuple[int, ...]:
    return settings.level, int(settings.access_log)


def _apply_shared(values: tuple[int, ...]) -> None:
    apply(_decode(values))


POD_SETTING = pod_settings.register("log-settings", 2, _apply_shared)


def change(request: Any) -> LogSettings:
    """A POST body: validate, apply here at once, publish to the pod's other workers. The
    fields it names change the pod's current settings, read under the lock: this worker's
    copy may not have followed another worker's change yet."""
    _applied.updated(request)  # validate first: a bad change stores nothing
    POD_SETTING.edit(lambda values: _encode(_decode(values).updated(request)), _encode(_applied))
    return _applied
