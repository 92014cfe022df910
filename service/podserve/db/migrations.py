"""Versioned SQL migrations shipped in the package (podserve/migrations/NNNN_name.sql).

`podserve db migrate` applies the missing ones in order, each in its own transaction,
under a session advisory lock: many pods starting at once (a Helm hook, init containers)
serialize on the lock, and all but the first find nothing left to do.

The lock lives as long as the session. A migrator whose network path dies (a node lost, a
conntrack entry dropped) leaves PostgreSQL a session that looks merely idle, so the lock would
be held until TCP keepalive gives up (hours by default) and every later migrate would wait
for it, then fail. The migrating session therefore asks PostgreSQL to end it once it sits idle
for `orphan_timeout_s`, inside a transaction or not; a live migrator is never idle that long.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Arbitrary but fixed: every podserve process must use the same key.
ADVISORY_LOCK_KEY = 0x706F_6473_6572_7665  # "podserve"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS podserve_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def packaged_migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files("podserve").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {versions}")
    return found


def latest_version() -> int:
    return max((m.version for m in packaged_migrations()), default=0)


async def applied_versions(conn: asyncpg.Connection) -> dict[int, str]:
    """{version: checksum} of applied migrations; empty when the schema was never migrated."""
    exists = await conn.fetchval("SELECT to_regclass('podserve_schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM podserve_schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


async def migrate(
    conn: asyncpg.Connection, lock_timeout_s: float = 300.0, orphan_timeout_s: float = 5.0
) -> list[int]:
    """Apply the missing migrations; return the versions applied by this call."""
    try:
        await take_migration_lock(conn, lock_timeout_s, orphan_timeout_s)
        await conn.execute(_CREATE_TABLE)
        applied = await applied_versions(conn)
        done: list[int] = []
        for migration in packaged_migrations():
            if migration.version in applied:
                _check_unchanged(migration, applied[migration.version])
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO podserve_schema_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info(
                "migration applied",
                extra={"version": migration.version, "migration": migration.name},
            )
            done.append(migration.version)
        return done
    finally:
        # Not held if taking it timed out: then this is a no-op (false, and a notice).
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        for name in _idle_bounds(conn):  # the caller's connection is its own again
            await conn.execute(f"RESET {name}")


def _idle_bounds(conn: asyncpg.Connection) -> list[str]:
    """The settings that end an idle session, of those this server knows."""
    names = ["idle_in_transaction_session_timeout"]
    if conn.get_server_version().major >= 14:  # idle_session_timeout is new in PostgreSQL 14
        names.append("idle_session_timeout")
    return names


async def take_migration_lock(
    conn: asyncpg.Connection, lock_timeout_s: float, orphan_timeout_s: float
) -> None:
    """Bound how long an orphan of this session can outlive its client, then take the lock."""
    bound_ms = max(1, round(orphan_timeout_s * 1000))
    names = _idle_bounds(conn)
    for name in names:
        await conn.execute(f"SET {name} = {bound_ms}")
    if "idle_session_timeout" not in names:
        log.warning(
            "PostgreSQL < 14 cannot end an idle session: a migrator lost mid-run holds the "
            "migration lock until TCP keepalive ends its session"
        )
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY, timeout=lock_timeout_s)


def _check_unchanged(migration: Migration, checksum: str) -> None:
    """An applied migration edited afterwards means the schema is not what the code expects."""
    if checksum != migration.checksum:
        raise MigrationError(
            f"migration {migration.version:04d}_{migration.name} changed after it was applied "
            "(checksum mismatch): add a new migration instead of editing an applied one"
        )


async def migrate_url(
    dsn: str, connect_timeout_s: float = 10.0, wait_s: float = 0.0, orphan_timeout_s: float = 5.0
) -> list[int]:
    """Connect (retrying for up to wait_s while the server is not up yet) and migrate."""
    conn = await _connect(dsn, connect_timeout_s, time.monotonic() + wait_s)
    try:
        return await migrate(conn, orphan_timeout_s=orphan_timeout_s)
    finally:
        await conn.close()


async def _connect(dsn: str, timeout_s: float, give_up_at: float) -> asyncpg.Connection:
    while True:
        try:
            return await asyncpg.connect(dsn, timeout=timeout_s)
        except (OSError, asyncpg.CannotConnectNowError) as exc:
            if time.monotonic() >= give_up_at:
                raise
            log.info("database not reachable yet; retrying", extra={"error": repr(exc)})
            await asyncio.sleep(1.0)


async def schema_status(conn: asyncpg.Connection) -> tuple[int, int]:
    """(applied version, latest packaged version)."""
    applied = await applied_versions(conn)
    return max(applied, default=0), latest_version()
