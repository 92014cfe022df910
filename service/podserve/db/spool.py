"""Append-only on-disk spool for prediction-log rows that PostgreSQL cannot take right now.

Layout: one immutable segment file per spilled batch, `<time_ns>-<pid>-<seq>.seg`, so the
names sort in spill order. A segment holds records `PSL1 | u32 length | u32 crc32 | payload`
(payload: a JSON list of rows). It is written to a hidden temp file, fsync'd, renamed into
place and the directory fsync'd: a segment that is visible is complete.

Rows PostgreSQL refuses for their own sake (a value, a constraint: not the table's, the
grants' or the database's state, which an operator or time fixes) are set aside in
`<time_ns>-<pid>-<seq>.rejected` files (JSON: the error and the rows), never replayed: kept
for an operator, so that one such row cannot hold up every row behind it. A segment whose
replay fails for its own sake (rows of another layout, an unreadable or unremovable file) is
renamed `.quarantined`, never replayed (or, where even that fails, skipped by the process).
An error that says the process or the system is short of something (`shortage`: descriptors,
kernel memory) is no fault of the file: the segment is kept and replayed later.

Several workers share the directory. Replay takes an exclusive `flock` on the segment and
checks it is still linked; the kernel drops the lock of a dead process, so segments of a
killed worker are replayed by whoever starts next. Replaying a segment twice is harmless:
the database ignores rows whose request id it already has.

A write that fails (full or read-only volume) removes its temp file: nothing else would,
and it would hold the very space the spool needs. Temp files of processes that died
mid-write (the PID is in the name) are removed when a spool is opened.

All methods block (file I/O and fsync): call them through asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import orjson

from podserve.db.file_locks import lock_linked

log = logging.getLogger(__name__)

MAGIC = b"PSL1"
HEADER = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
SUFFIX = ".seg"
REJECTED_SUFFIX = ".rejected"
QUARANTINE_SUFFIX = ".quarantined"  # a segment whose replay fails for its own sake
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # a file being written: `.<final name>.tmp`
# errnos of a process or system short of something, not of a file's fault: EMFILE and
# ENFILE (descriptors), ENOMEM and ENOBUFS (kernel memory), ENOLCK (locks), EAGAIN (try
# again). Not EIO (the medium), EACCES/EPERM/EROFS (the file's or the volume's state) nor
# ENOSPC/EDQUOT (the volume full: reading and renaming need no space).
SHORTAGE_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.ENOLCK, errno.EAGAIN}
)
# A temp file lives for one write and fsync. Its PID alone does not prove its writer dead
# where pods share a spool volume (another pod's PIDs are not ours): its age must too.
STALE_TEMP_S = 60.0


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seq = itertools.count()
        self.bytes = 0  # spooled and not yet replayed (as far as this process knows)

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temps()
        self.measure()

    def remove_stale_temps(self) -> int:
        """Delete the temp files of writers that are gone (killed between create and
        rename); a live writer's are left alone. Returns how many went."""
        removed = 0
        cutoff = time.time() - STALE_TEMP_S
        for entry in os.scandir(self.directory):
            pid = _temp_writer(entry.name)
            if pid is None or _alive(pid) or not _older_than(entry, cutoff):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # another worker got there first
                continue
            except OSError as exc:  # a read-only volume: the spool can still be read
                log.warning("cannot remove a stale spool temp file", extra={"error": repr(exc)})
                break
            removed += 1
        if removed:
            log.warning("removed stale spool temp files", extra={"files": removed})
        return removed

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
        try:
            self.measure()
        except OSError:  # the segment is durable: a failed gauge must not fail the write
            self.bytes += len(record)
        return final

    def set_aside(self, rows: list[Any], error: str) -> Path:
        """Rows the database refuses for their values, kept for an operator (never replayed)."""
        return self._write_file(orjson.dumps({"error": error, "rows": rows}), REJECTED_SUFFIX)

    def _write_file(self, content: bytes, suffix: str) -> Path:
        """Durably: a temp file, fsync'd, renamed into place, the directory fsync'd. One
        descriptor at a time (a process short of them may have one). If the directory's
        fsync fails, this raises with the file in place: the caller keeps the rows and
        writes them again (a second copy is harmless: replay is idempotent)."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq):06d}{suffix}"
        final = self.directory / name
        temp = self.directory / f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"
        try:
            _write_temp(temp, content)
            os.rename(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):  # never created, or a read-only volume
                temp.unlink()
            raise
        _fsync_dir(self.directory)
        return final

    def claim(self, path: Path) -> ClaimedSegment | None:
        """Lock a segment for replay; None if another process has it or it is gone."""
        fd = lock_linked(path)
        return None if fd is None else ClaimedSegment(self, path, fd)


class ClaimedSegment:
    def __init__(self, spool: Spool, path: Path, fd: int) -> None:
        self.spool = spool
        self.path = path
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.intact = True

    def read(self) -> list[Any]:
        """From the claimed descriptor itself: no second one, which a process short of
        descriptors could not get."""
        chunks = []
        offset = 0
        while chunk := os.pread(self.fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        rows, self.intact = decode_records(b"".join(chunks), self.path)
        return rows

    def remove(self) -> None:
        """Replayed: unlink while still holding the lock (a damaged one is kept aside).
        Raises only if the file stays where it is."""
        if self.intact:
            self.path.unlink(missing_ok=True)
        else:
            self.path.rename(self.path.with_suffix(".corrupt"))
        _sync_dir_after_change(self.path.parent)  # lost in a crash: replayed again, harmless
        self.spool.bytes = max(0, self.spool.bytes - self.size)

    def quarantine(self) -> Path:
        """Set aside, never replayed again: its replay fails for its own sake (rows of
        another layout, an unreadable file, a file that cannot be removed). Raises only if
        the file was not renamed."""
        aside = self.path.with_suffix(QUARANTINE_SUFFIX)
        self.path.rename(aside)
        _sync_dir_after_change(self.path.parent)  # lost in a crash: a segment, tried again
        self.spool.bytes = max(0, self.spool.bytes - self.size)
        return aside

    def close(self) -> None:
        os.close(self.fd)  # releases the flock


def shortage(exc: BaseException) -> bool:
    """Whether an error says the process or the system is short of something (descriptors,
    memory), not that a file is bad: what failed may work later, unchanged."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, OSError) and exc.errno in SHORTAGE_ERRNOS


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


def _write_temp(temp: Path, content: bytes) -> None:
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_writer(name: str) -> int | None:
    """The PID in a temp file's name (`.<time_ns>-<pid>-<seq><suffix>.tmp`), else None."""
    if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[len(TEMP_PREFIX) :].split("-")
    return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None


def _older_than(entry: os.DirEntry[str], cutoff: float) -> bool:
    try:
        return entry.stat().st_mtime < cutoff
    except FileNotFoundError:  # renamed or removed meanwhile
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir_after_change(directory: Path) -> None:
    """Best effort, after a rename or unlink that is made whatever the fsync says (EMFILE:
    the claimed segment may hold the process's last descriptor): a warning, not an error."""
    try:
        _fsync_dir(directory)
    except OSError as exc:
        log.warning(
            "spool directory not fsync'd after a rename or removal in it",
            extra={"path": str(directory), "error": repr(exc)},
        )
