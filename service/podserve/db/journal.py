"""Crash-safe journal of buffered prediction-log rows.

The request path appends each row to the in-memory buffer *and* writes it to this worker's
journal file with one `write()` (no fsync): once the syscall returns, the data is in the
kernel's page cache and survives the process being SIGKILLed (not a node crash; the spool's
fsync'd segments cover rows that wait longer). Journal segments are deleted once every row in
them reached PostgreSQL or the spool. A segment is full after ROTATE_ROWS rows or
ROTATE_BYTES bytes (the next row starts a new one), and a full one is deleted once durable,
the last one too: after an outage the journal does not keep its last segment (up to 2,000
big rows) on disk until shutdown. A starting worker converts the journals of dead workers
(whose `flock` the kernel released) into spool segments, which are then replayed; replaying a
row the database already has is a no-op (idempotent on request id).

Layout: `<spool_dir>/journal/<time_ns>-<pid>-<seq>.jnl`, one JSON row per line.

A write that fails (a full or read-only volume) raises OSError and leaves no partial line
behind: a torn line would swallow the next row too when the journal is read back.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from podserve.db.file_locks import lock_linked

log = logging.getLogger(__name__)

SUFFIX = ".jnl"
ROTATE_ROWS = 2000
# Bytes per segment: bounds what a durable last segment keeps on disk, and, with the
# buffer's byte bound, how many segments (open files) an outage needs (128 MiB / 8 MiB).
ROTATE_BYTES = 8 * 2**20


@dataclass
class _Segment:
    path: Path
    fd: int
    first_seq: int
    rows: int = 0
    size: int = 0  # bytes of whole lines written: where a failed write is cut back to
    torn: bool = False  # a partial line could not be cut off: write no more rows after it

    @property
    def end_seq(self) -> int:
        return self.first_seq + self.rows


class Journal:
    def __init__(
        self, directory: Path, rotate_rows: int = ROTATE_ROWS, rotate_bytes: int = ROTATE_BYTES
    ) -> None:
        self.directory = directory
        self.rotate_rows = rotate_rows
        self.rotate_bytes = rotate_bytes
        self.next_seq = 0
        self._segments: list[_Segment] = []
        self._count = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._start_segment()

    def _start_segment(self) -> None:
        self._count += 1
        path = self.directory / f"{time.time_ns()}-{os.getpid()}-{self._count}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until we close: marks us alive
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._segments.append(_Segment(path, fd, self.next_seq))

    def append(self, row: list[Any]) -> int:
        """Write one row; return its sequence number (rows are numbered in append order).

        OSError (disk full, read-only, I/O error): the row is not in the journal, and no
        part of it is; the next append tries again.
        """
        if not self._segments:  # the volume failed at start-up, or the last one was released
            self.open()
        elif self._done(self._segments[-1]):
            self._start_segment()  # before the write: a failed rotation loses no row written
        current = self._segments[-1]
        _write_line(current, orjson.dumps(row) + b"\n")
        seq = self.next_seq
        self.next_seq += 1
        current.rows += 1
        return seq

    def _done(self, segment: _Segment) -> bool:
        """No row is written to it any more: full (rows or bytes), or torn."""
        return segment.rows >= self.rotate_rows or segment.size >= self.rotate_bytes or segment.torn

    def release(self, oldest_pending_seq: int) -> None:
        """Delete the segments whose rows are all durable (seq < oldest_pending_seq).

        The last (current) segment goes too once it is done: no row will be written to it
        again (the next append starts a new one, as it would anyway), so deleting it loses
        nothing, and its bytes do not stay on disk until the next append or shutdown. One
        that is not full is kept, or every flush would delete and create a file."""
        segments = self._segments
        while segments and segments[0].end_seq <= oldest_pending_seq:
            if len(segments) == 1 and not self._done(segments[0]):
                return
            self._drop(segments.pop(0))

    def close(self, all_durable: bool) -> None:
        """At shutdown: delete everything if every row is durable, else keep it for recovery."""
        for segment in self._segments:
            if all_durable:
                self._drop(segment)
            else:
                os.close(segment.fd)  # unlocked: the next worker recovers it
        self._segments = []

    @staticmethod
    def _drop(segment: _Segment) -> None:
        segment.path.unlink(missing_ok=True)
        os.close(segment.fd)


def _write_line(segment: _Segment, line: bytes) -> None:
    """All of `line` or, on OSError, none of it: os.write may write part of it (the volume
    fills up mid-line) and fail only on the next call."""
    view = memoryview(line)
    written = 0
    try:
        while written < len(line):
            count = os.write(segment.fd, view[written:])
            if count == 0:  # no progress and no error: do not spin
                raise OSError(errno.ENOSPC, "journal write made no progress")
            written += count
    except OSError:
        if written:
            _cut_back(segment)
        raise
    segment.size += len(line)


def _cut_back(segment: _Segment) -> None:
    """Remove a partial line (truncating frees space, so it works on a full volume too)."""
    try:
        os.ftruncate(segment.fd, segment.size)
    except OSError:
        segment.torn = True  # the next row goes to a fresh segment, not glued to this part


def recover_dead_journals(directory: Path) -> list[tuple[Path, list[list[Any]], int]]:
    """Journals whose writer is gone: (path, rows, locked fd). Blocking: call in a thread.

    The caller makes the rows durable (spool), then calls `forget(path, fd)`, or closes the
    fd. On an error (EMFILE, ENOMEM) no fd is left open: a leaked one would hold the lock,
    and keep the journal from every worker's recovery, as long as this process lives.
    """
    found: list[tuple[Path, list[list[Any]], int]] = []
    try:
        paths = sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        return []
    try:
        for path in paths:
            fd = lock_linked(path)  # its writer is gone, and it is still there
            if fd is None:
                continue
            try:
                rows = _read_rows(path, fd)
            except BaseException:
                os.close(fd)
                raise
            found.append((path, rows, fd))
    except BaseException:
        for _, _, fd in found:
            os.close(fd)
        raise
    return found


def _read_rows(path: Path, fd: int) -> list[list[Any]]:
    """From the locked fd: no second descriptor, which a process short of them lacks."""
    data = bytearray()
    while chunk := os.pread(fd, 1 << 20, len(data)):
        data += chunk
    rows = []
    for number, line in enumerate(bytes(data).splitlines(), 1):
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            log.warning("skipping a torn journal line", extra={"path": str(path), "line": number})
    return rows


def forget(path: Path, fd: int) -> None:
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
