"""Find (or start) a PostgreSQL server for the tests, and make throwaway databases on it.

Order (README, Tests): PODSERVE_TEST_DATABASE_URL; else the local default
postgresql://postgres@127.0.0.1:5432/test; else a throwaway cluster started from the local
PostgreSQL binaries (as the `postgres` user when we are root: postgres refuses to run as
root); else fail with a hint.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ENV_URL = "PODSERVE_TEST_DATABASE_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
HINT = (
    "no PostgreSQL for the database tests. Either set PODSERVE_TEST_DATABASE_URL="
    "postgresql://USER@HOST:PORT/DB (a role that may CREATE DATABASE), or run a server on "
    "127.0.0.1:5432 with user postgres and database test, or install the server binaries "
    "(e.g. `apt-get install postgresql`) so the tests can start a throwaway cluster."
)


class NoPostgres(RuntimeError):
    pass


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _probe(url: str, timeout: float) -> None:
    conn = await asyncpg.connect(url, timeout=timeout)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def reachable(url: str, timeout: float = 3.0) -> str | None:
    """None if we can connect, else why not."""
    try:
        run(_probe(url, timeout))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def with_port(url: str, port: int) -> str:
    """The same URL through another local port (the tests' TCP proxy)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


@dataclass
class PostgresServer:
    """A server the tests may use: admin_url can CREATE DATABASE."""

    admin_url: str
    origin: str
    _stop: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for action in reversed(self._stop):
            action()
        self._stop.clear()


def find_or_start() -> PostgresServer:
    env_url = os.environ.get(ENV_URL)
    if env_url:
        problem = reachable(env_url)
        if problem:  # set on purpose: testing something else instead would mislead
            raise NoPostgres(f"{ENV_URL} is set but unreachable ({problem}). {HINT}")
        return PostgresServer(env_url, ENV_URL)
    if reachable(DEFAULT_URL) is None:
        return PostgresServer(DEFAULT_URL, "local default")
    bindir = _find_bindir()
    if bindir is None:
        raise NoPostgres(HINT)
    return _start_cluster(bindir)


def _find_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_cluster(bindir: Path) -> PostgresServer:
    """initdb + pg_ctl start in a temp dir, on a free port; stopped and removed after."""
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise NoPostgres(f"running as root and there is no 'postgres' user. {HINT}") from None
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="podserve-pg-"))
    data = root / "data"
    if user:
        shutil.chown(root, user)
    port = _free_port()

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bindir / args[0]), *args[1:]],
            user=user,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        pg(
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200",
            "start",
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        output = getattr(exc, "stderr", "") or ""
        raise NoPostgres(f"could not start a throwaway cluster: {output.strip()}. {HINT}") from None
    server = PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/postgres", f"throwaway {root}")
    server._stop.append(lambda: shutil.rmtree(root, ignore_errors=True))
    server._stop.append(
        lambda: pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop", check=False)
    )
    return server


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database with a random name; dropped (connections and all) afterwards."""
    name = f"podserve_test_{uuid.uuid4().hex[:12]}"
    run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(admin_url, name)
    finally:
        run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def migrate(url: str) -> list[int]:
    from podserve.db.migrations import migrate_url

    return run(migrate_url(url))


async def _query(url: str, sql: str, args: tuple[Any, ...]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return run(_query(url, sql, args))


def scalar(url: str, sql: str, *args: Any) -> Any:
    rows = query(url, sql, *args)
    return rows[0][0] if rows else None


async def _load_features(url: str, feature_set: str, count: int) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.executemany(
            'INSERT INTO podserve_features (feature_set, entity_id, "values") VALUES ($1, $2, $3)',
            [(feature_set, f"e{i}", [float(i)] * 4) for i in range(count)],
        )
    finally:
        await conn.close()


def load_features(url: str, feature_set: str, count: int) -> str:
    """Entities e0 .. e{count-1} of `feature_set`, each the 4-vector [i, i, i, i]; `url` back."""
    run(_load_features(url, feature_set, count))
    return url


async def _hold_lock(
    url: str, table: str, locked: threading.Event, release: threading.Event
) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            locked.set()
            while not release.is_set():
                await asyncio.sleep(0.01)
    finally:
        await conn.close()


@contextmanager
def table_locked(url: str, table: str) -> Iterator[None]:
    """Another session holds ACCESS EXCLUSIVE on `table` until the block ends, from a
    thread: every query on it waits (a slow database, from podserve's side)."""
    locked, release = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def hold() -> None:
        try:
            run(_hold_lock(url, table, locked, release))
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            failure.append(exc)
            locked.set()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert locked.wait(10) and not failure, failure or f"could not lock {table}"
        yield
    finally:
        release.set()
        holder.join(10)


def server_env(url: str, spool_dir: Path, **overrides: str) -> dict[str, str]:
    """podserve settings for a database test: short timeouts and retries keep tests short."""
    return {
        "PODSERVE_DATABASE_URL": url,
        "PODSERVE_SPOOL_DIR": str(spool_dir),
        "PODSERVE_DB_CONNECT_TIMEOUT_S": "0.5",
        "PODSERVE_DB_COMMAND_TIMEOUT_S": "1",
        "PODSERVE_PREDICTION_LOG_MAX_BACKOFF_S": "0.5",
        **overrides,
    }


# --- the lost-COMMIT tests (tests/db): a write whose path dies before its COMMIT ----------
def lost_commit_settings(url: str, proxy_port: int, **knobs: Any) -> Any:
    """Settings through the proxy: a write gives up after 1 s, and PostgreSQL ends a session
    idle inside a write transaction after 2 s (so the orphan outlives the first timeout)."""
    from podserve.settings import Settings

    return Settings(
        database_url=with_port(url, proxy_port),
        db_pool_min=0,
        db_command_timeout_s=0.5,
        db_connect_timeout_s=0.5,
        db_idle_in_transaction_timeout_s=2.0,
        **knobs,
    )


async def retry_past_orphan(write: Callable[[], Awaitable[Any]], bound_s: float = 15) -> Any:
    """Retry `write` while it times out (waiting on an orphaned transaction's locks), for up
    to bound_s; (its result or None, seconds taken)."""
    started = time.monotonic()
    while time.monotonic() - started < bound_s:
        try:
            return await write(), round(time.monotonic() - started, 2)
        except TimeoutError:
            await asyncio.sleep(0.1)
    return None, round(time.monotonic() - started, 2)
