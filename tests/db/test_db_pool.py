"""The pool hands connections back without asyncpg's reset round trip, and still safely."""

from __future__ import annotations

import asyncpg
import pytest

import postgres
from podserve.db.pool import Database
from podserve.settings import Settings


async def _last_statement(db_url: str, pid: int) -> tuple[str, str]:
    """What PostgreSQL says the backend ran last, and its state, seen from another session."""
    observer = await asyncpg.connect(db_url)
    try:
        row = await observer.fetchrow(
            "SELECT query, state FROM pg_stat_activity WHERE pid = $1", pid
        )
    finally:
        await observer.close()
    assert row is not None
    return row["query"], row["state"]


@pytest.mark.parametrize("reset", [False, True])
def test_released_connections_skip_the_reset_query_unless_asked(db_url: str, reset: bool) -> None:
    settings = Settings(database_url=db_url, db_pool_min=1, db_pool_max=1,
                        db_reset_sessions=reset)  # fmt: skip

    async def scenario() -> tuple[str, str]:
        db = Database(settings)
        await db.open()
        try:
            async with db.connection(5.0) as conn:
                pid = conn.get_server_pid()
                assert await conn.fetchval("SELECT 41 + 1") == 42
            return await _last_statement(db_url, pid)  # released by now
        finally:
            await db.close()

    query, state = postgres.run(scenario())
    assert state == "idle"
    if reset:  # asyncpg's default: a second round trip after every use
        assert "RESET ALL" in query
    else:
        assert query == "SELECT 41 + 1"


def test_a_transaction_left_open_is_still_rolled_back(db_url: str) -> None:
    settings = Settings(database_url=db_url, db_pool_min=1, db_pool_max=1)

    async def scenario() -> tuple[bool, str, int | None]:
        db = Database(settings)
        await db.open()
        try:
            async with db.connection(5.0) as conn:
                await conn.execute("BEGIN")
                await conn.execute("CREATE TABLE left_open (x int)")
                pid = conn.get_server_pid()
            _, state = await _last_statement(db_url, pid)
            async with db.connection(5.0) as again:  # the same connection (pool of one)
                assert again.get_server_pid() == pid
                table = await again.fetchval("SELECT to_regclass('left_open')::text")
                return again.is_in_transaction(), state, table
        finally:
            await db.close()

    in_transaction, state, table = postgres.run(scenario())
    assert not in_transaction and state == "idle"
    assert table is None  # rolled back, not committed
