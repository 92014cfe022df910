"""Append-only on-disk spool for prediction-log rows that PostgreSQL cannot take right now.

Layout: one immutable segment file per spilled batch, `<time_ns>-<pid>-<seq>.seg`, so the
names sort in spill order. A segment holds records `PSL1 | u32 length | u32 crc32 | payload`
(payload: a JSON list of rows). It is written to a hidden temp file, fsync'd, renamed into
place and the directory fsync'd: a segment that is visible is complete.

Rows PostgreSQL refuses for their values (not for its state) are set aside in
`<time_ns>-<pid>-<seq>.rejected` files (JSON: the error and the rows), never replayed: kept
for an operator, so that one such row cannot hold up every row behind it.

Several workers share the directory. Replay takes an exclusive `flock` on the segment and
checks it is still linked; the kernel drops the lock of a dead process, so segments of a
killed worker are replayed by whoever starts next. Replaying a segment twice is harmless:
the database ignores rows whose request id it already has.

All methods block (file I/O and fsync): call them through asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

MAGIC = b"PSL1"
HEADER = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
SUFFIX = ".seg"
REJECTED_SUFFIX = ".rejected"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seq = itertools.count()
        self.bytes = 0  # spooled and not yet replayed (as far as this process knows)
        self.segments_written = 0

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.measure()

    def segments(self) -> list[Path]:
        """Complete segments, oldest first."""
        try:
            names = sorted(e.name for e in os.scandir(self.directory) if e.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []
        return [self.directory / name for name in names]

    def measure(self) -> int:
        """Bytes in the directory's segments now, whoever spooled them: a segment another
        worker replays leaves no count behind in the worker that spilled it."""
        total = 0
        for path in self.segments():
            with contextlib.suppress(FileNotFoundError):  # replayed meanwhile
                total += path.stat().st_size
        self.bytes = total
        return total

    def write(self, rows: list[Any]) -> Path:
        payload = orjson.dumps(rows)
        record = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        final = self._write_file(record, SUFFIX)
        self.measure()
        self.segments_written += 1
        return final

    def set_aside(self, rows: list[Any], error: str) -> Path:
        """Rows the database refuses for their values, kept for an operator (never replayed)."""
        return self._write_file(orjson.dumps({"error": error, "rows": rows}), REJECTED_SUFFIX)

    def _write_file(self, content: bytes, suffix: str) -> Path:
        """Durably: a temp file, fsync'd, renamed into place, the directory fsync'd."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq):06d}{suffix}"
        final = self.directory / name
        temp = self.directory / f".{name}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
        _fsync_dir(self.directory)
        return final

    def claim(self, path: Path) -> ClaimedSegment | None:
        """Lock a segment for replay; None if another process has it or it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)  # replayed and removed meanwhile
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        return ClaimedSegment(self, path, fd)


class ClaimedSegment:
    def __init__(self, spool: Spool, path: Path, fd: int) -> None:
        self.spool = spool
        self.path = path
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.intact = True

    def read(self) -> list[Any]:
        with os.fdopen(os.dup(self.fd), "rb") as handle:
            data = handle.read()
        rows, self.intact = decode_records(data, self.path)
        return rows

    def remove(self) -> None:
        """Replayed: unlink while still holding the lock (a damaged one is kept aside)."""
        if self.intact:
            self.path.unlink(missing_ok=True)
        else:
            self.path.rename(self.path.with_suffix(".corrupt"))
        _fsync_dir(self.path.parent)
        self.spool.bytes = max(0, self.spool.bytes - self.size)

    def close(self) -> None:
        os.close(self.fd)  # releases the flock


def decode_records(data: bytes, path: Path) -> tuple[list[Any], bool]:
    """The rows of the intact records, and whether the whole segment was intact."""
    rows: list[Any] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            log.error("spool segment has a torn header", extra={"path": str(path)})
            return rows, False
        magic, length, crc = HEADER.unpack_from(data, offset)
        payload = data[offset + HEADER.size : offset + HEADER.size + length]
        if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            log.error("spool segment is corrupt", extra={"path": str(path)})
            return rows, False
        rows.extend(orjson.loads(payload))
        offset += HEADER.size + length
    return rows, True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
