"""One asyncpg pool per worker, behind a circuit breaker.

When PostgreSQL is down, a request must get its 503 within the feature timeout and
must not queue behind others that are already waiting: the breaker opens after a few
connection failures and then fails fast (one probe at a time), and the number of
requests waiting for a connection is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from podserve.errors import ServiceUnavailable
from podserve.settings import Settings

log = logging.getLogger(__name__)

# Errors that mean "no usable database" (as opposed to a bad query): count toward the breaker.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
)

NOT_CONFIGURED = "PostgreSQL is not configured: set PODSERVE_DATABASE_URL"


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> half-open (one probe) -> closed."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def admit(self) -> bool:
        """May a call go to the database now? (Half-open admits a single probe.)"""
        if not self.is_open:
            return True
        if time.monotonic() < self.open_until or self.probing:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.is_open:
            self.open_until = time.monotonic() + self.reset_s

    def release_probe(self) -> None:
        """A probe that ended without telling us anything (a bad query, a cancelled request)."""
        self.probing = False


class Database:
    def __init__(self, settings: Settings) -> None:
        assert settings.database_url is not None
        self.settings = settings
        self.dsn = settings.database_url.get_secret_value()
        self.breaker = CircuitBreaker(settings.db_breaker_failures, settings.db_breaker_reset_s)
        # First statement of every write transaction. If this client goes silent inside one
        # (its COMMIT lost on a dead path), PostgreSQL ends the session instead of holding
        # its row locks, which block the re-sent rows, until TCP keepalive gives up (hours).
        # SET LOCAL, not a connection parameter: PgBouncer refuses unknown startup parameters.
        bound_ms = round(settings.db_idle_in_transaction_timeout_s * 1000)
        self.bound_transaction_sql = f"SET LOCAL idle_in_transaction_session_timeout = {bound_ms}"
        self.max_waiting = settings.db_max_waiting
        self.waiting = 0
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> bool:
        """Connect db_pool_min connections; if PostgreSQL is down, start empty (False)."""
        try:
            self.pool = await self._create_pool(self.settings.db_pool_min)
            return True
        except (*CONNECTION_ERRORS, TimeoutError) as exc:
            log.warning(
                "database unreachable at start-up; connecting on demand", extra={"error": repr(exc)}
            )
            self.pool = await self._create_pool(0)
            return False

    async def _create_pool(self, min_size: int) -> asyncpg.Pool:
        s = self.settings
        return await asyncpg.create_pool(
            self.dsn,
            min_size=min(min_size, s.db_pool_max),
            max_size=s.db_pool_max,
            statement_cache_size=s.db_statement_cache_size,
            command_timeout=s.db_command_timeout_s,
            timeout=s.db_connect_timeout_s,
            server_settings={"application_name": f"podserve-{socket.gethostname()}-{os.getpid()}"},
            reset=None if s.db_reset_sessions else keep_session,
        )

    async def close(self, timeout_s: float = 1.0) -> None:
        if self.pool is None:
            return
        try:
            await asyncio.wait_for(self.pool.close(), timeout_s)
        except TimeoutError:
            self.pool.terminate()  # connections stuck on a dead network: do not hang shutdown

    @asynccontextmanager
    async def connection(self, timeout_s: float) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for a request: 503 at once when the database is known down."""
        if self.pool is None:
            raise ServiceUnavailable(NOT_CONFIGURED)
        retry = {"Retry-After": str(max(1, round(self.breaker.reset_s)))}
        if self.waiting >= self.max_waiting:
            raise ServiceUnavailable("database busy: too many requests waiting", retry)
        if not self.breaker.admit():
            raise ServiceUnavailable("database unavailable (failing fast; retry later)", retry)
        conn = await self._acquire(timeout_s, retry)
        try:
            yield conn
        except TimeoutError:  # the caller's 504 (TimeoutError is an OSError: catch it first)
            # Slow or unreachable: repeated timeouts open the breaker too, or requests would
            # pile up behind a dead network.
            _drop(conn)
            self.breaker.failure()
            raise
        except CONNECTION_ERRORS as exc:
            _drop(conn)
            self.breaker.failure()
            raise ServiceUnavailable(f"database unavailable: {_describe(exc)}", retry) from None
        except asyncio.CancelledError:
            _drop(conn)
            self.breaker.release_probe()
            raise
        except BaseException:
            self.breaker.release_probe()
            raise
        else:
            self.breaker.success()
        finally:
            await _release(self.pool, conn)

    async def _acquire(self, timeout_s: float, retry: dict[str, str]) -> asyncpg.Connection:
        assert self.pool is not None
        self.waiting += 1
        try:
            return await self.pool.acquire(timeout=timeout_s)
        except TimeoutError:
            self.breaker.failure()
            raise ServiceUnavailable(
                f"database unavailable: no connection within {timeout_s:g} s", retry
            ) from None
        except CONNECTION_ERRORS as exc:
            self.breaker.failure()
            raise ServiceUnavailable(f"database unavailable: {_describe(exc)}", retry) from None
        except BaseException:
            self.breaker.release_probe()
            raise
        finally:
            self.waiting -= 1

    @asynccontextmanager
    async def background(self, timeout_s: float) -> AsyncIterator[asyncpg.Connection]:
        """A connection for background work: no breaker, errors propagate to the caller's retry."""
        if self.pool is None:
            raise ServiceUnavailable(NOT_CONFIGURED)
        conn = await self.pool.acquire(timeout=timeout_s)
        try:
            yield conn
        except (TimeoutError, asyncio.CancelledError, *CONNECTION_ERRORS):
            _drop(conn)
            raise
        finally:
            await _release(self.pool, conn)


async def keep_session(conn: asyncpg.Connection) -> None:
    """What a connection goes through on its way back to the pool instead of a reset query.

    asyncpg's default runs `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
    ALL` on every release: a second round trip per feature lookup, holding the connection
    (measured: ~10% of a worker's samples in the PostgreSQL scenario). podserve leaves no
    session state behind: no advisory locks (only `podserve db migrate`, on a connection of
    its own), no LISTEN, no cursors outside transactions, no session SETs (write
    transactions use SET LOCAL). An open transaction is still rolled back, by asyncpg before
    this runs. PODSERVE_DB_RESET_SESSIONS=true brings the reset query back.
    """


def _drop(conn: asyncpg.Connection) -> None:
    """Close a connection that timed out, was cancelled or broke, without waiting: a reset
    (or the wait for a query cancellation) would hang on the same dead network."""
    with contextlib.suppress(asyncpg.InterfaceError):  # already closed and handed back
        conn.terminate()


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    try:
        await pool.release(conn)
    except Exception:  # asyncpg terminated it and returned its slot: a new one replaces it
        log.debug("connection dropped on release", exc_info=True)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
