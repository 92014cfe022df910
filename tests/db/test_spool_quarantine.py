"""A spool segment whose replay fails for its own sake must not stop prediction-log writing.

The live buffer drains whatever the replay does; a segment of rows of another layout, or one
that cannot be removed, is quarantined (renamed `.quarantined`, or skipped when even that
fails) and named in an error log; a segment held back by the database's state is kept and
replayed once the database answers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from log_rows import affine_rows, log_settings, running_log, until

import postgres
from podserve.db.pool import Database
from podserve.db.prediction_log import PredictionLog
from podserve.db.spool import ClaimedSegment, Spool
from tcp_proxy import TcpProxy

LOGGER = "podserve.db.prediction_log"


def _count(url: str, prefix: str) -> int:
    return postgres.scalar(
        url,
        "SELECT count(*) FROM podserve_prediction_log WHERE client_request_id LIKE $1",
        f"{prefix}%",
    )


@pytest.mark.parametrize(
    "bad_rows",
    [[["not", "a", "row"]], [[1, 2, 3, 4, 5, 6, 7, 8, 9, "not a time"]]],
    ids=["short-row-IndexError", "wrong-types-TypeError"],
)
def test_a_segment_of_rows_of_another_layout_is_quarantined_and_writing_goes_on(
    db_url: str, tmp_path: Path, bad_rows: list[list[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"layout-{uuid.uuid4().hex[:8]}-"
    settings = log_settings(db_url, tmp_path)
    spool = Spool(tmp_path)
    spool.open()
    bad = spool.write(bad_rows)  # oldest: replayed first
    spool.write(affine_rows(f"{prefix}seg-", 5))  # a good segment behind it

    async def scenario() -> dict[str, Any]:
        async with running_log(settings, tmp_path) as plog:
            for row in affine_rows(f"{prefix}live-", 30):
                plog.append(row)
            await until(lambda: plog.rows_written >= 35)
            return {
                "written": plog.rows_written,
                "failures": plog.failures,
                "depth": plog.buffer_depth,
                "quarantined": getattr(plog, "segments_quarantined", None),
            }

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        stats = postgres.run(scenario())
    assert stats == {"written": 35, "failures": 0, "depth": 0, "quarantined": 1}, stats
    assert _count(db_url, prefix) == 35
    assert not list(tmp_path.glob("*.seg"))
    assert [p.name for p in tmp_path.glob("*.quarantined")] == [
        bad.with_suffix(".quarantined").name
    ]
    [record] = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert record.segment == str(bad) and "Error" in record.error, record.__dict__


def test_a_segment_that_cannot_be_removed_nor_renamed_is_skipped_and_logged_once(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As on a volume that turned read-only: the segment's rows are written, it cannot be
    removed or set aside, so this worker skips it (not claim it again every pass)."""
    prefix = f"stuck-{uuid.uuid4().hex[:8]}-"
    settings = log_settings(db_url, tmp_path)
    spool = Spool(tmp_path)
    spool.open()
    stuck = spool.write(affine_rows(f"{prefix}seg-", 3))
    claims: list[Path] = []
    real_claim = Spool.claim

    def claim(self: Spool, path: Path) -> ClaimedSegment | None:
        claims.append(path)
        return real_claim(self, path)

    def refuse(self: ClaimedSegment) -> Path:
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(Spool, "claim", claim)
    monkeypatch.setattr(ClaimedSegment, "remove", refuse)
    monkeypatch.setattr(ClaimedSegment, "quarantine", refuse, raising=False)

    async def scenario() -> dict[str, Any]:
        async with running_log(settings, tmp_path) as plog:
            for row in affine_rows(f"{prefix}live-", 30):
                plog.append(row)
            await until(lambda: plog.rows_written >= 33)
            for _ in range(3):  # more passes (as the rescan makes): it is not claimed again
                plog._spool_pending = True
                plog._wake.set()
                await asyncio.sleep(0.1)
            return {
                "written": plog.rows_written,
                "failures": plog.failures,
                "depth": plog.buffer_depth,
            }

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        stats = postgres.run(scenario())
    assert stats == {"written": 33, "failures": 0, "depth": 0}, stats
    assert _count(db_url, prefix) == 33
    assert claims.count(stuck) == 1, claims
    assert stuck.exists()
    [record] = [r for r in caplog.records if "skips it" in r.getMessage()]
    assert record.segment == str(stuck) and "PermissionError" in record.error


def test_a_segment_held_back_by_the_database_is_kept_and_replayed_later(
    db_url: str, tmp_path: Path
) -> None:
    """Never lose a row that could still be written: a connection error during the replay
    keeps the segment (not quarantined) until the database answers again."""
    prefix = f"held-{uuid.uuid4().hex[:8]}-"
    spool = Spool(tmp_path)
    spool.open()
    segment = spool.write(affine_rows(f"{prefix}seg-", 4))

    async def scenario(proxy: TcpProxy) -> dict[str, Any]:
        settings = log_settings(postgres.with_port(db_url, proxy.port), tmp_path)
        db = Database(settings)
        await db.open()
        proxy.cut()
        plog = PredictionLog(db, Spool(tmp_path), settings)
        await plog.start()
        try:
            await until(lambda: plog.write_errors >= 2)
            kept = segment.exists()
            proxy.restore()
            # Counted replayed only once the segment is removed, after its rows are written.
            await until(lambda: plog.rows_written >= 4 and plog.rows_replayed >= 4)
            return {
                "kept": kept,
                "written": plog.rows_written,
                "replayed": plog.rows_replayed,
                "quarantined": getattr(plog, "segments_quarantined", 0),
            }
        finally:
            await asyncio.wait_for(plog.close(), 10)
            await db.close()

    with TcpProxy(*postgres.host_port(db_url)) as proxy:
        stats = postgres.run(scenario(proxy))
    assert stats == {"kept": True, "written": 4, "replayed": 4, "quarantined": 0}, stats
    assert _count(db_url, prefix) == 4
    assert not list(tmp_path.glob("*.seg")) and not list(tmp_path.glob("*.quarantined"))


def test_a_segment_quarantined_half_written_counts_only_its_unwritten_rows(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its first chunk (10 rows, PODSERVE_PREDICTION_LOG_BATCH_ROWS) is written, the next
    fails for its layout: 1 row rejected, not 11 (the 10 are in the database)."""
    prefix = f"half-{uuid.uuid4().hex[:8]}-"
    settings = log_settings(db_url, tmp_path)
    spool = Spool(tmp_path)
    spool.open()
    spool.write([*affine_rows(f"{prefix}seg-", 10), ["not", "a", "row"]])

    async def scenario() -> tuple[int, int]:
        async with running_log(settings, tmp_path) as plog:
            await until(lambda: plog.segments_quarantined == 1)
            return plog.rows_rejected, plog.segments_quarantined

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        rejected, quarantined = postgres.run(scenario())
    assert (rejected, quarantined) == (1, 1)
    assert _count(db_url, prefix) == 10
    [record] = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert record.rows_unwritten == 1, record.__dict__
