"""Structured JSON logs on stderr, one object per line, with trace ids when a span is active."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import stat
import sys
import threading
import time
import weakref
from typing import Any, TextIO

import orjson
from opentelemetry import trace

from podserve.request_id import AccessFields, current_request_id

# Record attributes that are not user-supplied `extra` fields (uvicorn adds color_message).
_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def _trace_fields() -> dict[str, str]:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


# A traceback logged again from the same place within this window is one line, not ~4 KB.
TRACEBACK_WINDOW_S = 60.0
_SITES_KEPT = 1024  # places remembered (a new one beyond: the oldest is forgotten)


class JsonFormatter(logging.Formatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sites: dict[tuple[str, ...], list[float]] = {}  # site -> [window start, repeats]
        self._sites_lock = threading.Lock()

    def _exception_fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The full traceback the first time a site raises in a window; then its type and
        message, and the repeat's number: a storm of one failure (a 500 per request, and
        uvicorn's own line for it) wrote two full tracebacks per request."""
        exc_type, exc, tb = record.exc_info  # type: ignore[misc]
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        frame = (tb.tb_frame.f_code.co_filename, str(tb.tb_lineno)) if tb else ("", "")
        site = (record.name, str(record.msg), getattr(exc_type, "__qualname__", "None"), *frame)
        with self._sites_lock:
            seen = self._sites.get(site)
            if seen is not None and record.created - seen[0] < TRACEBACK_WINDOW_S:
                seen[1] += 1
                return _repeat_fields(exc_type, exc, seen)
            if seen is None and len(self._sites) >= _SITES_KEPT:
                del self._sites[next(iter(self._sites))]
            self._sites[site] = [record.created, 0]
        fields: dict[str, Any] = {"exc": self.formatException(record.exc_info)}  # type: ignore[arg-type]
        if seen is not None and seen[1]:
            fields["exc_repeats_last_window"] = int(seen[1])
        return fields

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _ts(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": os.getpid(),
        }
        entry.update(_trace_fields())
        request_id = current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry.update(self._exception_fields(record))
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:  # lone surrogates (undecodable file names), ints past 64 bits, non-str
            return json.dumps(_plain(entry), default=str)  # keys: still one JSON line


def _repeat_fields(exc_type: Any, exc: BaseException | None, seen: list[float]) -> dict[str, Any]:
    name = getattr(exc_type, "__name__", "None")
    repeat = int(seen[1])
    summary = f"{name}: {exc} (traceback as logged at {_ts(seen[0])}, repeat {repeat})"
    return {"exc": summary, "exc_repeat": repeat}


def _ts(created: float, msecs: float | None = None) -> str:
    msecs = (created - int(created)) * 1000 if msecs is None else msecs
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(msecs):03d}Z"


def _plain(value: Any) -> Any:
    """Dict keys as strings, all the way down (the standard encoder takes the rest)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


# Lines a process holds while stderr is not taken (~10k lines: a few MiB at most).
BUFFERED_LINES = 10_000
FLUSH_WAIT_S = 5.0  # at exit (logging.shutdown): how long the lines still held may take


class BackgroundStderrHandler(logging.Handler):
    """Formats in the caller's thread (the trace ids are its context) and writes the line
    there if that cannot block, else hands it (and the lines after it) to a writer thread:
    a write to a full stderr pipe (a log collector that stalls) blocked the event loop, and
    with it every request and the liveness probe. Past BUFFERED_LINES a line is dropped and
    counted; the writer reports the count once stderr takes lines again.
    """

    def __init__(self, stream: TextIO | None = None, capacity: int = BUFFERED_LINES) -> None:
        super().__init__()
        self.stream = stream
        self.capacity = capacity
        self._reset()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (h := ref()) and h._reset())

    def _reset(self) -> None:
        """No thread yet, nothing held (in a forked child: the parent's lines are its own)."""
        self._lines: queue.Queue[str] = queue.Queue(self.capacity)
        self._dropped = 0
        self._drop_lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's own contract: report, never raise
            self.handleError(record)
            return
        if not self._lines.unfinished_tasks and self._write_now(line):
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
            self._writer.start()
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            with self._drop_lock:
                self._dropped += 1

    def _write_now(self, line: str) -> bool:
        """Written here when that cannot block (nothing held, room in the pipe for the whole
        line): a worker that dies of a signal right after (uvicorn raises the SIGTERM it
        caught again, at the default action) still has its last lines out."""
        stream = self.stream or sys.stderr
        try:
            fd = _descriptor(stream)
            if fd is None:  # a test's StringIO: cannot block
                _write_to_stream(stream, line)
                return True
            data = _encoded(stream, line)
            if not _has_room(fd, len(data)):  # bytes: a non-ASCII line is longer than len()
                return False
            written = os.write(fd, data)
        except BlockingIOError:  # an O_NONBLOCK stderr whose room another writer took first
            return False  # nothing written: the writer thread writes it whole
        except Exception:  # stderr closed, its reader gone (EPIPE): nowhere left to say so
            return True
        if written < len(data):  # a socket may take part of it (a pipe takes all or nothing)
            with contextlib.suppress(Exception):
                _write_all(fd, data[written:])
        return True

    def _write(self) -> None:
        while True:
            line = self._lines.get()
            try:
                stream = self.stream or sys.stderr
                dropped = self._take_dropped()
                if dropped:
                    _write_line(stream, _dropped_line(dropped))
                _write_line(stream, line)
            except Exception:  # stderr closed: nowhere left to say so
                pass
            finally:
                self._lines.task_done()

    def _take_dropped(self) -> int:
        with self._drop_lock:
            dropped, self._dropped = self._dropped, 0
        return dropped

    def flush(self) -> None:
        """Waits (bounded) for the lines held: logging.shutdown calls it at exit."""
        deadline = time.monotonic() + FLUSH_WAIT_S
        while self._lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)


def _descriptor(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # no descriptor, or the stream is closed
        return None


def _encoded(stream: TextIO, line: str) -> bytes:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return (line + "\n").encode(encoding, "backslashreplace")  # as sys.stderr's errors


def _write_to_stream(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()


def _write_line(stream: TextIO, line: str) -> None:
    """To the file descriptor itself, past the stream and its lock: a writer thread blocked
    in a buffered stream's write on a full pipe holds that lock, and a process forked then
    (Gunicorn's master forking a worker) has it held for ever: its lines never came out."""
    fd = _descriptor(stream)
    if fd is None:
        _write_to_stream(stream, line)
    else:
        _write_all(fd, _encoded(stream, line))


def _write_all(fd: int, data: bytes) -> None:
    """All of `data`, however many writes that takes (a signal can cut a pipe write short;
    a line past the pipe's size goes in as the reader makes room). os.write retries EINTR
    itself; EPIPE and EBADF raise to the caller."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # O_NONBLOCK set on the shared description (by another holder)
            _wait_writable(fd)


def _wait_writable(fd: int) -> None:
    """Until the descriptor takes bytes, or fails (an error or hang-up: the next write raises)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll()


def _has_room(fd: int, size: int) -> bool:
    """A write of `size` bytes cannot block: a regular file, or a pipe or socket that polls
    writable (room for PIPE_BUF bytes at least) and a line no longer than that."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return size <= select.PIPE_BUF and bool(poller.poll(0))


def _dropped_line(count: int) -> str:
    record = logging.makeLogRecord({
        "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": "log lines dropped: stderr was not taking them (a full pipe, a stalled "
               "log collector)", "dropped": count,
    })  # fmt: skip
    return JsonFormatter().format(record)


def configure_logging(level: str = "info", access_log: bool = False) -> None:
    """Route every logger (ours, gunicorn's, uvicorn's) through one JSON handler."""
    handler = BackgroundStderrHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python's warnings as JSON lines too, not bare stderr text
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = _propagates(name, access_log)
    # Its line's fields (an instance of its own: addFilter skips one it holds already).
    logging.getLogger("uvicorn.access").addFilter(_ACCESS_FIELDS)


_ACCESS_FIELDS = AccessFields()


def _propagates(logger: str, access_log: bool) -> bool:
    """Off, the access loggers neither handle nor propagate. uvicorn's HTTP protocols log
    every response when `logging.getLogger("uvicorn.access").hasHandlers()`, whatever
    its own `access_log` config says; measured, that line (record, JSON, write to stderr)
    was ~12% of the event loop's samples per tabular request."""
    return access_log or not logger.endswith(".access")


def _logger_config(name: str, level: str, access_log: bool) -> dict[str, Any]:
    return {"level": level.upper(), "handlers": [], "propagate": _propagates(name, access_log)}


def gunicorn_logconfig_dict(level: str = "info", access_log: bool = False) -> dict[str, Any]:
    """Gunicorn's own loggers in the same JSON format, for the master process too, and through
    the same handler as the workers': a master blocked writing to a full stderr pipe neither
    replaced a dead worker nor handled a signal."""
    names = ("gunicorn.error", "gunicorn.access", "uvicorn.error", "uvicorn.access")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "podserve.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {"class": "podserve.logs.BackgroundStderrHandler", "formatter": "json"}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {name: _logger_config(name, level, access_log) for name in names},
    }
