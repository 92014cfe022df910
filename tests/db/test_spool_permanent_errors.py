"""Rows no retry can write are set aside and counted; rows a retry may write are kept.

Permanent, a row's own fault: a constraint or a value that refuses a row (classes 22, 23):
the rows that fail alone are set aside in `.rejected` files (counted in rows_rejected) and
the others written, live and replayed alike. Transient, the table's or the grants' state
(an operator's to fix): a column dropped or of another type (class 42, the codec's
TypeError), tried once on a fresh staging table, and a missing table are retried with a
hint of what to do, every row kept; an outage counts one write error per writer pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from asyncpg.exceptions._base import DataError as ClientDataError
from log_rows import affine_rows, log_settings, running_log, until

import postgres
from podserve.db.prediction_log import (
    SCHEMA_MISMATCH,
    row_error,
    statement_error,
)
from podserve.db.spool import Spool
from podserve.settings import Settings

LOGGER = "podserve.db.prediction_log"
TABLE = "podserve_prediction_log"


@pytest.fixture
def fresh_url(pg_server: postgres.PostgresServer) -> Iterator[str]:
    """A migrated database of this test's own: the tests change its schema."""
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        yield url


def _logged(url: str) -> set[str]:
    return {r[0] for r in postgres.query(url, f"SELECT client_request_id FROM {TABLE}")}


def _set_aside(spool_dir: Path) -> list[dict[str, Any]]:
    return [orjson.loads(p.read_bytes()) for p in sorted(spool_dir.glob("*.rejected"))]


def _half_live_half_spooled(spool_dir: Path, prefix: str, count: int) -> list[list[Any]]:
    """`count` rows to append, and as many in a spool segment (replayed at start)."""
    spool = Spool(spool_dir)
    spool.open()
    spool.write(affine_rows(f"{prefix}seg-", count))
    return affine_rows(f"{prefix}live-", count)


async def _log_all(settings: Settings, spool_dir: Path, live: list[list[Any]], total: int) -> Any:
    async with running_log(settings, spool_dir) as plog:
        for row in live:
            plog.append(row)
        done = await until(lambda: plog.rows_written + plog.rows_rejected >= total)
        return done, plog.rows_written, plog.rows_rejected, plog.failures, plog.replay_failures


def test_rows_a_constraint_refuses_are_set_aside_and_the_others_written(
    fresh_url: str, tmp_path: Path
) -> None:
    """Class 23 (a CHECK constraint) depends on the row: found by halving, set aside alone."""
    postgres.query(
        fresh_url,
        f"ALTER TABLE {TABLE} ADD CONSTRAINT no_sevens CHECK (client_request_id NOT LIKE '%7')",
    )
    live = _half_live_half_spooled(tmp_path, "check-", 20)  # ...-7 and ...-17: refused
    stats = postgres.run(_log_all(log_settings(fresh_url, tmp_path), tmp_path, live, 40))
    assert stats == (True, 36, 4, 0, 0), stats
    expected = {f"check-{kind}-{i}" for kind in ("seg", "live") for i in range(20)}
    refused = {f"check-{kind}-{i}" for kind in ("seg", "live") for i in (7, 17)}
    assert _logged(fresh_url) == expected - refused
    files = _set_aside(tmp_path)
    assert {row[1] for f in files for row in f["rows"]} == refused
    assert all("CheckViolationError" in f["error"] for f in files), files
    assert not list(tmp_path.glob("*.seg"))  # replayed, not retried for ever


def test_a_column_added_not_null_with_a_default_takes_every_row(
    fresh_url: str, tmp_path: Path
) -> None:
    """The safe way to add a column (NOT NULL DEFAULT ...): the table's default fills it.
    The staging table copied NOT NULL but not the default (LIKE), so every row was refused
    in the stage and set aside for good."""
    postgres.query(fresh_url, f"ALTER TABLE {TABLE} ADD COLUMN tenant text NOT NULL DEFAULT 'x'")
    live = _half_live_half_spooled(tmp_path, "default-", 10)
    stats = postgres.run(_log_all(log_settings(fresh_url, tmp_path), tmp_path, live, 20))
    assert stats == (True, 20, 0, 0, 0), stats
    assert not _set_aside(tmp_path)
    assert {r[0] for r in postgres.query(fresh_url, f"SELECT tenant FROM {TABLE}")} == {"x"}


@pytest.mark.parametrize(
    ("change", "restore", "error"),
    [
        (
            f"ALTER TABLE {TABLE} DROP COLUMN timings_ms",
            f"ALTER TABLE {TABLE} ADD COLUMN timings_ms jsonb NOT NULL",
            "UndefinedColumnError",
        ),
        (
            f"ALTER TABLE {TABLE} ALTER COLUMN model_version TYPE integer USING 0",
            f"ALTER TABLE {TABLE} ALTER COLUMN model_version TYPE text",
            "Error(",  # the codec's TypeError or ValueError
        ),
        (
            f"ALTER TABLE {TABLE} ADD COLUMN tenant text NOT NULL",
            f"ALTER TABLE {TABLE} ALTER COLUMN tenant SET DEFAULT 'default'",
            "NotNullViolationError",
        ),
    ],
    ids=["dropped-column-42703", "column-of-another-type", "not-null-column-unwritten-23502"],
)
def test_a_changed_schema_keeps_every_row_warns_and_writes_them_once_it_is_put_back(
    fresh_url: str,
    tmp_path: Path,
    change: str,
    restore: str,
    error: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As in a rolling upgrade before `podserve db migrate`: the table's state, not the
    rows'. Nothing is set aside (no unbounded pile of `.rejected` files), nothing is lost or
    quarantined, the warnings of the buffer's writes and of the spool's replay say what to
    do, and once the schema is put back every row is written, once."""
    postgres.query(fresh_url, change)
    live = _half_live_half_spooled(tmp_path, "schema-", 15)
    settings = log_settings(fresh_url, tmp_path)

    async def scenario() -> dict[str, Any]:
        async with running_log(settings, tmp_path) as plog:
            for row in live:
                plog.append(row)
            await until(lambda: plog.failures >= 3 and plog.replay_failures >= 3)
            while_changed = {
                "written": plog.rows_written,
                "rejected": plog.rows_rejected,
                "segments": len(list(tmp_path.glob("*.seg"))),
            }
            await asyncio.to_thread(postgres.query, fresh_url, restore)
            await until(lambda: plog.rows_written >= 30)
            return {
                "changed": while_changed,
                "written": plog.rows_written,
                "rejected": plog.rows_rejected,
                "after": plog.failures,
            }

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stats = postgres.run(scenario())
    changed = {"written": 0, "rejected": 0, "segments": 1}
    assert stats == {"changed": changed, "written": 30, "rejected": 0, "after": 0}, stats
    expected = {f"schema-{kind}-{i}" for kind in ("seg", "live") for i in range(15)}
    assert _logged(fresh_url) == expected
    assert not _set_aside(tmp_path) and not list(tmp_path.glob("*.quarantined"))
    assert not list(tmp_path.glob("*.seg"))
    warnings = [r for r in caplog.records if "failed; retrying" in r.getMessage()]
    assert {r.getMessage().split(" ")[0] for r in warnings} == {"prediction", "prediction-log"}
    for record in warnings:  # the buffer's and the replay's
        assert record.error.startswith(SCHEMA_MISMATCH), record.__dict__
        assert error in record.error, record.__dict__
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_spooled_row_of_this_length_but_other_types_is_quarantined_not_retried(
    fresh_url: str, tmp_path: Path
) -> None:
    """A codec's TypeError is the table's state for a row of this layout (retried): a
    spooled row whose text column holds a number is the segment's fault, quarantined."""
    spool = Spool(tmp_path)
    spool.open()
    [row] = affine_rows("typed-seg-", 1)
    spool.write([[*row[:3], 3, *row[4:]]])  # model_version a number: no podserve's row
    live = affine_rows("typed-live-", 5)

    async def scenario() -> tuple[int, int, int, int]:
        async with running_log(log_settings(fresh_url, tmp_path), tmp_path) as plog:
            for live_row in live:
                plog.append(live_row)
            await until(lambda: plog.segments_quarantined == 1 and plog.rows_written >= 5)
            return (
                plog.rows_written,
                plog.rows_rejected,
                plog.segments_quarantined,
                plog.replay_failures,
            )

    assert postgres.run(scenario()) == (5, 1, 1, 0)
    assert len(list(tmp_path.glob("*.quarantined"))) == 1 and not _set_aside(tmp_path)
    assert not list(tmp_path.glob("*.seg"))


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (asyncpg.CheckViolationError("check"), "row"),  # 23514
        (asyncpg.NotNullViolationError("null"), "statement"),  # 23502: the table's state
        (asyncpg.InvalidTextRepresentationError("json"), "row"),  # 22P02
        (asyncpg.StringDataRightTruncationError("long"), "row"),  # 22001
        (ClientDataError("cannot encode"), "row"),
        (asyncpg.UndefinedColumnError("column"), "statement"),  # 42703
        (asyncpg.DatatypeMismatchError("type"), "statement"),  # 42804
        (asyncpg.InsufficientPrivilegeError("grant"), "statement"),  # 42501
        (TypeError("codec"), "statement"),
        (ValueError("codec"), "statement"),
        (asyncpg.UndefinedTableError("table"), "transient"),  # 42P01: SCHEMA_MISSING
        (asyncpg.ReadOnlySQLTransactionError("failover"), "transient"),  # 25006
        (asyncpg.ConnectionDoesNotExistError("gone"), "transient"),
        (asyncpg.InterfaceError("closed"), "transient"),
        (OSError("refused"), "transient"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else value,
)
def test_which_errors_set_rows_aside(exc: BaseException, kind: str) -> None:
    """Only a row's own fault is set aside; the table's state and the database's are not."""
    assert (row_error(exc), statement_error(exc)) == (kind == "row", kind == "statement")


def test_a_column_changed_under_a_connection_s_staging_table_is_no_reason_to_set_rows_aside(
    fresh_url: str, tmp_path: Path
) -> None:
    """The staging table a connection made before a migration still has the old column
    type (INSERT ... SELECT then fails with 42804): made again, the rows are written."""
    settings = log_settings(fresh_url, tmp_path, db_pool_max=1)  # the same connection throughout

    async def scenario() -> tuple[int, int]:
        async with running_log(settings, tmp_path) as plog:
            await plog.write(affine_rows("stale-before-", 2))  # the connection's stage made
            await asyncio.to_thread(
                postgres.query,
                fresh_url,
                f"ALTER TABLE {TABLE} ALTER COLUMN trace_id TYPE integer USING NULL",
            )
            for row in affine_rows("stale-after-", 5):  # trace_id None: fits an integer
                plog.append(row)
            await until(lambda: plog.rows_written + plog.rows_rejected >= 7)
            return plog.rows_written, plog.rows_rejected

    assert postgres.run(scenario()) == (7, 0)
    assert not _set_aside(tmp_path)


def test_a_missing_table_is_retried_and_the_warnings_say_to_migrate(
    empty_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unmigrated: nothing is set aside (the migrations may still come), the warnings of the
    buffer's writes and of the spool's replay say what to do, and once migrated all is in."""
    live = _half_live_half_spooled(tmp_path, "unmigrated-", 5)
    settings = log_settings(empty_db, tmp_path)

    async def scenario() -> dict[str, Any]:
        async with running_log(settings, tmp_path) as plog:
            for row in live:
                plog.append(row)
            await until(lambda: plog.failures >= 3 and plog.replay_failures >= 3)
            rejected = plog.rows_rejected
            await asyncio.to_thread(postgres.migrate, empty_db)
            await until(lambda: plog.rows_written >= 10)
            return {"rejected": rejected, "written": plog.rows_written, "after": plog.failures}

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stats = postgres.run(scenario())
    assert stats == {"rejected": 0, "written": 10, "after": 0}, stats
    assert len(_logged(empty_db)) == 10 and not _set_aside(tmp_path)
    warnings = [r for r in caplog.records if "failed; retrying" in r.getMessage()]
    assert {r.getMessage().split(" ")[0] for r in warnings} == {"prediction", "prediction-log"}
    for record in warnings:  # the buffer's and the replay's
        assert "run `podserve db migrate`" in record.error, record.__dict__


def test_an_outage_keeps_the_rows_and_counts_one_write_error_a_pass(tmp_path: Path) -> None:
    """A connection that cannot be made is no reason to set rows aside; the replay of a
    spool and the buffer's drain failing in one writer pass are one write error (it was
    the sum of both: twice the rate as soon as anything was spooled)."""
    live = _half_live_half_spooled(tmp_path, "down-", 5)
    settings = log_settings("postgresql://nobody@127.0.0.1:1/none", tmp_path)

    async def scenario() -> dict[str, int]:
        async with running_log(settings, tmp_path) as plog:
            for row in live:
                plog.append(row)
            await until(lambda: plog.failures >= 5 and plog.replay_failures >= 3)
            return {  # read together: no await between them
                "errors": plog.write_errors,
                "failures": plog.failures,
                "replay_failures": plog.replay_failures,
                "rejected": plog.rows_rejected,
                "buffered": plog.buffer_depth,
            }

    stats = postgres.run(scenario())
    assert stats["errors"] == stats["failures"] and stats["replay_failures"] >= 3, stats
    assert stats["rejected"] == 0 and stats["buffered"] == 5, stats
    assert not _set_aside(tmp_path) and len(list(tmp_path.glob("*.seg"))) >= 1
