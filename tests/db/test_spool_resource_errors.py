"""A worker short of file descriptors (EMFILE) keeps its spool and journals for a later pass.

EMFILE says the process is short of something, not that a file is bad: a spool segment whose
replay meets it is kept (not quarantined, which left its rows on disk for an operator), a
segment of rows of another layout is quarantined (and its log line says so), and a dead
worker's journal is not left locked by a leaked descriptor. Once descriptors are freed, every
row reaches PostgreSQL.

Each scenario runs in a subprocess (this file, run as a script) whose own descriptor table is
filled up to its soft limit but for `free` slots, so the replay fails at a known step: with 1
free slot, the segment's claim takes it and the next step finds none.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from log_rows import affine_rows, log_settings, running_log, until

import podserve
import postgres
from podserve.db.prediction_log import PredictionLog
from podserve.db.spool import ClaimedSegment, Spool

TESTS = Path(__file__).resolve().parent.parent  # run as a script: on PYTHONPATH for postgres

SEGMENT_ROWS = 5
LOGGERS = ("podserve.db.prediction_log", "podserve.db.spool")


def _hold_descriptors(free: int) -> list[int]:
    """Fill this process's descriptor table (soft limit lowered to a few more than are open,
    so that takes few files) but for `free` slots; returns the held fds."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
    held: list[int] = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
    for _ in range(free):
        os.close(held.pop())
    return held


def _release(held: list[int], soft: int) -> None:
    for fd in held:
        os.close(fd)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )


def _dead_journal(directory: Path, rows: list[list[Any]]) -> None:
    """A journal as a SIGKILLed worker leaves it: rows, one per line, and no lock on it."""
    lines = b"".join(orjson.dumps(row) + b"\n" for row in rows)
    (directory / f"{os.getpid() + 1_000_000}-1.jnl").write_bytes(lines)


async def _scenario(url: str, spool_dir: Path, free: int, kind: str, prefix: str) -> Any:
    """Replay (or recover) while short of descriptors, then with them back."""
    async with running_log(log_settings(url, spool_dir), spool_dir) as plog:
        plog.append(affine_rows(f"{prefix}live-", 1)[0])  # a pooled connection: none to open
        assert await until(lambda: plog.rows_written == 1)
        rows = affine_rows(f"{prefix}{kind}-", SEGMENT_ROWS)
        if kind == "bad":
            plog.spool.write([["not", "a", "row"]])
        elif kind == "journal":
            assert plog.journal is not None
            _dead_journal(plog.journal.directory, rows)
        else:
            plog.spool.write(rows)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        held = _hold_descriptors(free)
        try:
            plog._spool_pending = True
            plog._wake.set()
            await until(lambda: plog.replay_failures or _done(plog, kind), 5)
            failed_while_short = plog.replay_failures
        finally:
            _release(held, soft)
        await until(lambda: _done(plog, kind) and not plog.replay_failures, 5)
        return {
            "failed_while_short": failed_while_short,
            "replayed": plog.rows_replayed,
            "quarantined": plog.segments_quarantined,
            "replay_failures": plog.replay_failures,
        }


def _done(plog: PredictionLog, kind: str) -> bool:
    if kind == "bad":
        return plog.segments_quarantined > 0
    return plog.rows_replayed >= SEGMENT_ROWS


def _run_scenario(url: str, spool_dir: Path, free: int, kind: str) -> dict[str, Any]:
    """This file as a script, on the podserve package this test imported."""
    prefix = f"emfile-{uuid.uuid4().hex[:8]}-"
    path = os.pathsep.join([str(Path(podserve.__file__).resolve().parents[1]), str(TESTS)])
    result = subprocess.run(
        [sys.executable, __file__, url, str(spool_dir), str(free), kind, prefix],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = orjson.loads(result.stdout.splitlines()[-1])
    report["logged"] = _logged(url, f"{prefix}{kind}-")
    return report


def _logged(url: str, prefix: str) -> int:
    return postgres.scalar(
        url,
        "SELECT count(*) FROM podserve_prediction_log WHERE client_request_id LIKE $1",
        f"{prefix}%",
    )


@pytest.mark.parametrize("free", [0, 1, 2, 3])
def test_a_segment_replayed_short_of_descriptors_is_kept_and_written_once_they_are_back(
    db_url: str, tmp_path: Path, free: int
) -> None:
    """It was quarantined (`.quarantined`, its rows never replayed) when the read found no
    descriptor, and logged as 'nor set aside' though the rename had been made."""
    report = _run_scenario(db_url, tmp_path, free, "segment")
    assert report["logged"] == SEGMENT_ROWS, report
    assert report["quarantined"] == 0 and report["errors"] == [], report
    assert report["replay_failures"] == 0, report
    assert not list(tmp_path.glob("*.quarantined")) and not list(tmp_path.glob("*.seg"))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("free", [1, 2])
def test_a_bad_segment_met_short_of_descriptors_is_quarantined_once_and_said_so(
    db_url: str, tmp_path: Path, free: int
) -> None:
    """Rows of another layout: the read failed for want of a descriptor, and the segment was
    renamed `.quarantined` but logged as 'nor set aside' (the directory's fsync failed). Now
    it is read through the claimed descriptor, renamed (which takes none), and the one error
    log says quarantined."""
    report = _run_scenario(db_url, tmp_path, free, "bad")
    assert report["quarantined"] == 1 and report["replay_failures"] == 0, report
    [error] = report["errors"]
    assert error.endswith("quarantined"), report
    assert len(list(tmp_path.glob("*.quarantined"))) == 1 and not list(tmp_path.glob("*.seg"))


@pytest.mark.parametrize("free", [1, 2])
def test_a_dead_worker_s_journal_recovered_short_of_descriptors_is_recovered_later(
    db_url: str, tmp_path: Path, free: int
) -> None:
    """Its descriptor leaked (EMFILE reading it, or spooling its rows) and held its lock, so
    neither this worker nor another recovered it while this one lived."""
    report = _run_scenario(db_url, tmp_path, free, "journal")
    assert report["logged"] == SEGMENT_ROWS, report
    assert report["quarantined"] == 0 and report["errors"] == [], report
    assert not list((tmp_path / "journal").glob("*.jnl")) and not list(tmp_path.glob("*.seg"))


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        (OSError(errno.ENOMEM, "Cannot allocate memory"), True),
        (OSError(errno.ENFILE, "Too many open files in system"), True),
        (MemoryError(), True),
        (OSError(errno.EIO, "Input/output error"), False),  # the medium: the file's own
    ],
    ids=lambda value: repr(value) if isinstance(value, BaseException) else str(value),
)
def test_a_read_error_keeps_the_segment_only_if_the_process_was_short_of_something(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, kept: bool
) -> None:
    """The first read fails (no descriptor shortage can make a read of the claimed fd fail,
    so it is made to); a shortage keeps the segment for the next pass, EIO quarantines it."""
    prefix = f"read-{uuid.uuid4().hex[:8]}-"
    Spool(tmp_path).write(affine_rows(prefix, SEGMENT_ROWS))
    failures, real_read = [error], ClaimedSegment.read

    def read(self: ClaimedSegment) -> list[Any]:
        if failures:
            raise failures.pop()
        return real_read(self)

    monkeypatch.setattr(ClaimedSegment, "read", read)

    async def scenario() -> tuple[int, int]:
        async with running_log(log_settings(db_url, tmp_path), tmp_path) as plog:
            await until(lambda: plog.rows_replayed or plog.segments_quarantined, 5)
            return plog.rows_replayed, plog.segments_quarantined

    assert postgres.run(scenario()) == ((SEGMENT_ROWS, 0) if kept else (0, 1))
    assert _logged(db_url, prefix) == (SEGMENT_ROWS if kept else 0)
    assert len(list(tmp_path.glob("*.quarantined"))) == (0 if kept else 1)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(url: str, spool_dir: str, free: str, kind: str, prefix: str) -> None:
    errors = _Errors()
    for name in LOGGERS:
        logging.getLogger(name).addHandler(errors)
    report = asyncio.run(_scenario(url, Path(spool_dir), int(free), kind, prefix))
    print(orjson.dumps({**report, "errors": errors.messages}).decode())


if __name__ == "__main__":
    main(*sys.argv[1:])
