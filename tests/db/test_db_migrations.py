"""`podserve db migrate`: idempotent, safe to run from many processes at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import asyncpg
import pytest

import postgres
from podserve.db.migrations import (
    MigrationError,
    latest_version,
    migrate,
    migrate_url,
    packaged_migrations,
    take_migration_lock,
)
from podserve.db.url_check import url_problem
from tcp_proxy import TcpProxy

PODSERVE = [sys.executable, "-m", "podserve.cli"]
TABLES = {
    "podserve_schema_migrations",
    "podserve_feature_sets",
    "podserve_features",
    "podserve_prediction_log",
    "podserve_jobs",
}


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PODSERVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _status(url: str) -> int:
    """`podserve db status`'s exit code: 0 up to date, 1 migrations pending."""
    return subprocess.run(
        [*PODSERVE, "db", "status", "--database-url", url], capture_output=True, check=False
    ).returncode


def test_two_processes_migrate_concurrently_schema_applied_once(empty_db: str) -> None:
    assert _status(empty_db) == 1  # not migrated
    procs = [_cli("db", "migrate", "--database-url", empty_db) for _ in range(2)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], results
    outputs = sorted(out.strip() for _, out, _ in results)
    # The advisory lock serializes them: exactly one applied the schema, the other found it done.
    assert outputs == [
        f"migrations applied: {list(range(1, latest_version() + 1))}",
        "schema up to date",
    ], results

    versions = postgres.query(empty_db, "SELECT version FROM podserve_schema_migrations")
    assert sorted(r["version"] for r in versions) == [m.version for m in packaged_migrations()]
    tables = postgres.query(empty_db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert {r["tablename"] for r in tables} == TABLES
    columns = postgres.query(
        empty_db,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'podserve_features'",
    )
    assert {r["column_name"]: r["data_type"] for r in columns}["values"] == "ARRAY"

    again = subprocess.run(
        [*PODSERVE, "db", "migrate", "--database-url", empty_db],
        capture_output=True,
        text=True,
        check=True,
    )
    assert again.stdout.strip() == "schema up to date"
    assert _status(empty_db) == 0


def test_an_edited_applied_migration_is_refused(empty_db: str) -> None:
    postgres.migrate(empty_db)
    postgres.query(
        empty_db, "UPDATE podserve_schema_migrations SET checksum = 'x' WHERE version = 1"
    )
    try:
        with pytest.raises(MigrationError, match="changed after it was applied"):
            postgres.run(migrate_url(empty_db))
    finally:
        checksum = packaged_migrations()[0].checksum
        postgres.query(
            empty_db,
            "UPDATE podserve_schema_migrations SET checksum = $1 WHERE version = 1",
            checksum,
        )


def test_migrate_needs_a_database_url() -> None:
    result = subprocess.run(
        [*PODSERVE, "db", "migrate"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "PODSERVE_DATABASE_URL" in result.stderr


def test_unreachable_database_fails_loudly() -> None:
    nowhere = "postgresql://postgres@127.0.0.1:1/none"
    with pytest.raises((OSError, asyncpg.PostgresError)):
        postgres.run(migrate_url(nowhere, connect_timeout_s=2))
    result = subprocess.run(
        [*PODSERVE, "db", "migrate", "--database-url", nowhere, "--wait", "1.5"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ConnectionRefusedError")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "idle-in-transaction"])
def test_a_migrator_lost_mid_run_does_not_hold_the_lock(
    pg_server: postgres.PostgresServer, in_transaction: bool
) -> None:
    """A migrator's network path dies while it holds the lock, between migrations or inside
    one's transaction: PostgreSQL is never told, so only the session's own idle bound ends
    it. The next migrate gets the lock within that bound (without it: keepalive, hours)."""

    async def scenario(url: str, proxy: TcpProxy) -> dict[str, object]:
        lost = await asyncpg.connect(postgres.with_port(url, proxy.port))
        await take_migration_lock(lost, lock_timeout_s=5, orphan_timeout_s=1.5)
        if in_transaction:
            await lost.execute("BEGIN")
        proxy.sever_at(b"SELECT 'lost'")
        with pytest.raises(TimeoutError):
            await lost.execute("SELECT 'lost'", timeout=0.5)
        orphan = lost.get_server_pid()
        direct = await asyncpg.connect(url)
        try:
            state = "SELECT state FROM pg_stat_activity WHERE pid = $1"
            orphan_state = await direct.fetchval(state, orphan)
            started = time.monotonic()
            applied = await migrate(direct, lock_timeout_s=15)
            seconds = time.monotonic() - started
            orphan_after = await direct.fetchval(state, orphan)
            restored = [
                await direct.fetchval(f"SHOW {name}")
                for name in ("idle_session_timeout", "idle_in_transaction_session_timeout")
            ]
        finally:
            await direct.close()
            lost.terminate()
        return {
            "severed": proxy.severed,
            "orphan_state": orphan_state,
            "orphan_after": orphan_after,
            "applied": applied,
            "seconds": round(seconds, 2),
            "restored": restored,
        }

    with (
        postgres.fresh_database(pg_server.admin_url) as url,
        TcpProxy(*postgres.host_port(url)) as proxy,
    ):
        stats = postgres.run(scenario(url, proxy))
    held_as = "idle in transaction" if in_transaction else "idle"
    assert stats["severed"] == 1 and stats["orphan_state"] == held_as, stats
    assert stats["applied"] == [m.version for m in packaged_migrations()], stats
    assert stats["orphan_after"] is None and stats["seconds"] < 10, stats
    assert stats["restored"] == ["0", "0"], stats  # the caller's session is its own again


PORT = "port is not a number from 1 to 65535"
BAD_URLS = {
    "postgresql://podserve:s3cret@127.0.0.1:abc/test": PORT,
    "postgresql://podserve:s3cret@127.0.0.1:99999/test": PORT,
    "postgresql://podserve:s3cret@db1:5432,db2:x/test": PORT,
    "postgresql://podserve:s3cret@db/test?port=5432,0": PORT,
    # An unescaped '#' ends the host part inside the password: "port" 's3c' was printed.
    "postgresql://podserve:s3c#ret@db:5432/test": PORT,
    "postgresql+asyncpg://podserve:s3cret@db/test": "must start with postgresql://",
}


@pytest.mark.parametrize("command", ["migrate", "status"])
@pytest.mark.parametrize(("url", "problem"), BAD_URLS.items(), ids=range(len(BAD_URLS)))
def test_a_database_url_asyncpg_cannot_use_is_one_line_without_its_password(
    command: str, url: str, problem: str
) -> None:
    """Before: asyncpg's ValueError or OverflowError, a traceback from its URL parser."""
    by_flag = [*PODSERVE, "db", command, "--database-url", url]
    by_env = [*PODSERVE, "db", command]
    for argv, env in ((by_flag, {}), (by_env, {"PODSERVE_DATABASE_URL": url})):
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=30, env={**os.environ, **env}
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and problem in result.stderr, result.stderr
        assert "s3c" not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1/test",
        "postgres://postgres:pw@127.0.0.1:5432/test?sslmode=disable",
        "postgresql://postgres@db1:5432,db2,[::1]:5433/test",
        "postgresql:///test?host=/var/run/postgresql&port=5432",
    ],
)
def test_database_urls_asyncpg_takes_pass_the_check(url: str) -> None:
    assert url_problem(url) is None
