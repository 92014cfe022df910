"""One asyncpg pool per worker, behind a circuit breaker.

When PostgreSQL is down, a request must get its 503 within the feature timeout and
must not queue behind others that are already waiting: the breaker opens after a few
connection failures and then fails fast (one probe at a time), and the number of
requests waiting for a connection is bounded.

Waiting for a connection that this worker's own requests hold (every one in use) is not a
database failure: it is a 503 "database busy" that leaves the breaker alone. A semaphore of
db_pool_max slots in front of the pool tells the two apart: once a request holds a slot,
the pool has a connection for it, or room to open one, so a timeout after that is PostgreSQL
(connecting) and counts.
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

from podserve.errors import DeadlineExceeded, ServiceUnavailable
from podserve.metrics import DB_POOL_WAIT_BUCKETS, ObservationTally
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
        self.pool_max = settings.db_pool_max
        # A busy worker (its own requests hold every connection) clears in milliseconds: the
        # overload's Retry-After, not the breaker's reset time.
        self._busy_retry = {"Retry-After": str(settings.retry_after_s)}
        # One slot per pool connection, taken before the pool's acquire (module docstring).
        self._slots = asyncio.Semaphore(settings.db_pool_max)
        # Each request's wait for a connection (podserve_db_pool_wait_seconds): a slow
        # `features` phase with long waits is an exhausted pool, with short ones the database.
        self.pool_waits = ObservationTally(DB_POOL_WAIT_BUCKETS)
        self.pool: asyncpg.Pool | None = None
        # A timed-out query keeps running in its backend (holding a pool slot there, and a
        # max_connections slot) until PostgreSQL hears of it: asyncpg sends a CancelRequest on
        # a second connection, which we give this long (it has to connect) before closing.
        self.cancel_grace_s = settings.db_connect_timeout_s
        self._hand_backs: set[asyncio.Task[None]] = set()
        self.query_timeout_message = (
            f"database query took longer than {settings.db_command_timeout_s:g} s "
            "(PODSERVE_DB_COMMAND_TIMEOUT_S)"
        )

    async def open(self) -> bool:
        """Connect db_pool_min connections; if PostgreSQL is down, start empty (False)."""
        try:
            self.pool = await self._create_pool(self.settings.db_pool_min)
            return True
        except asyncpg.ClientConfigurationError:  # an InterfaceError too, but no outage:
            raise  # every connection would fail the same way, so the start fails, naming it
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
        if self._hand_backs:  # connections whose queries are being cancelled come back first
            await asyncio.wait(self._hand_backs, timeout=timeout_s)
        try:
            await asyncio.wait_for(self.pool.close(), timeout_s)
        except TimeoutError:
            self.pool.terminate()  # connections stuck on a dead network: do not hang shutdown
        for task in list(self._hand_backs):
            task.cancel()

    @asynccontextmanager
    async def connection(
        self, timeout_s: float, timeout_message: str | None = None, request_deadline: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for a request: 503 at once when the database is known down.

        Every failure is a retryable 5xx: no connection in time or none at all is a 503, a
        query that times out (its own timeout, or asyncpg's command_timeout) a 504 saying
        which timeout fired (`timeout_message`). `request_deadline`: timeout_s is what was
        left of the request's own deadline, so running out of it says nothing about the
        database and does not count toward the breaker.
        """
        assert self.pool is not None  # open() ran first: it sets the pool or raises
        retry = {"Retry-After": str(max(1, round(self.breaker.reset_s)))}
        if self.waiting >= self.max_waiting:  # this worker's load, not the database: clears fast
            raise ServiceUnavailable("database busy: too many requests waiting", self._busy_retry)
        if not self.breaker.admit():
            raise ServiceUnavailable("database unavailable (failing fast; retry later)", retry)
        conn: asyncpg.Connection | None = await self._acquire(
            timeout_s, retry, timeout_message if request_deadline else None
        )
        try:
            yield conn
        except TimeoutError:  # an OSError too: caught before CONNECTION_ERRORS
            self._hand_back_later(conn)  # the query's cancellation is on its way: let it land
            conn = None
            if request_deadline:  # the request's own deadline says nothing about the database
                self.breaker.release_probe()
                raise deadline_exceeded(
                    timeout_message or self.query_timeout_message, None
                ) from None
            # Slow or unreachable: repeated timeouts open the breaker too, or requests would
            # pile up behind a dead network.
            self.breaker.failure()
            raise deadline_exceeded(timeout_message or self.query_timeout_message, retry) from None
        except asyncpg.QueryCanceledError as exc:  # the server's statement_timeout, an admin
            self.breaker.failure()
            raise deadline_exceeded(f"database cancelled the query: {exc}", retry) from None
        except CONNECTION_ERRORS as exc:
            _drop(conn)
            self.breaker.failure()
            raise ServiceUnavailable(f"database unavailable: {_describe(exc)}", retry) from None
        except asyncio.CancelledError:  # the client went away mid-query: cancel it there too
            self._hand_back_later(conn)
            conn = None
            self.breaker.release_probe()
            raise
        except BaseException:
            self.breaker.release_probe()
            raise
        else:
            self.breaker.success()
        finally:
            if conn is not None:
                await self._release(conn)

    async def _release(self, conn: asyncpg.Connection, timeout_s: float | None = None) -> None:
        """Back to the pool, then its slot (the pool has the connection again by then)."""
        assert self.pool is not None
        try:
            await _release(self.pool, conn, timeout_s)
        finally:
            self._slots.release()

    def _hand_back_later(self, conn: asyncpg.Connection) -> None:
        """Return a connection whose query timed out or was cancelled, off the request path.

        asyncpg has sent (or is sending) a CancelRequest for the query; closing the
        connection now would cancel that send, and a backend waiting on a lock never
        notices a closed socket: it would go on waiting, then working, for nobody. The
        pool's release waits for the cancellation (at most cancel_grace_s: on a dead network
        it never comes) and then keeps the connection, or closes it.
        """
        assert self.pool is not None
        task = asyncio.create_task(self._release(conn, self.cancel_grace_s))
        self._hand_backs.add(task)  # a reference, or the task could be collected mid-way
        task.add_done_callback(self._hand_backs.discard)

    async def _acquire(
        self, timeout_s: float, retry: dict[str, str], deadline_message: str | None = None
    ) -> asyncpg.Connection:
        """`deadline_message`: timeout_s is the rest of the request's deadline (504 then)."""
        assert self.pool is not None
        self.waiting += 1
        started = time.perf_counter()
        try:
            left = await self._take_slot(timeout_s, deadline_message, started)
            try:
                return await self.pool.acquire(timeout=left)
            except BaseException:
                self._slots.release()
                raise
        except TimeoutError:
            if deadline_message is not None:  # the request's budget ran out, not the database
                self.breaker.release_probe()
                raise DeadlineExceeded(deadline_message) from None
            self.breaker.failure()
            raise ServiceUnavailable(self._no_connection(timeout_s), retry) from None
        except CONNECTION_ERRORS as exc:
            self.breaker.failure()
            raise ServiceUnavailable(f"database unavailable: {_describe(exc)}", retry) from None
        except BaseException:
            self.breaker.release_probe()
            raise
        finally:
            self.waiting -= 1
            # A wait that ended in a 503 or 504 counts too: that is what an exhausted pool does.
            self.pool_waits.observe(time.perf_counter() - started)

    async def _take_slot(
        self, timeout_s: float, deadline_message: str | None, started: float
    ) -> float:
        """Wait for one of the pool's connections to be free; the seconds left of timeout_s
        (counted from `started`, a perf_counter() reading).

        Running out here means every connection stayed in use by this worker's own work
        (healthy or not, the queries that hold them count for themselves): a 503 "busy" or
        the request's 504, never a breaker failure.
        """
        if not self._slots.locked():  # one free: taken at once, without a timer
            await self._slots.acquire()
            return timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            self.breaker.release_probe()
            if deadline_message is not None:
                raise DeadlineExceeded(deadline_message) from None
            raise ServiceUnavailable(
                f"database busy: all {self.pool_max} connections of this worker stayed in use "
                f"for {timeout_s:g} s (PODSERVE_DB_POOL_MAX)",
                self._busy_retry,
            ) from None
        return max(0.001, timeout_s - (time.perf_counter() - started))

    def _no_connection(self, timeout_s: float) -> str:
        """asyncpg raises the same TimeoutError for both: name each (no clock read to tell)."""
        connect_s = self.settings.db_connect_timeout_s
        if connect_s >= timeout_s:
            return f"database unavailable: no connection within {timeout_s:g} s"
        return (
            f"database unavailable: no connection within {timeout_s:g} s, or connecting took "
            f"longer than {connect_s:g} s (PODSERVE_DB_CONNECT_TIMEOUT_S)"
        )

    @asynccontextmanager
    async def background(self, timeout_s: float) -> AsyncIterator[asyncpg.Connection]:
        """A connection for background work: no breaker, errors propagate to the caller's retry."""
        assert self.pool is not None  # open() ran first: it sets the pool or raises
        started = time.perf_counter()
        if self._slots.locked():
            async with asyncio.timeout(timeout_s):  # its TimeoutError reaches the caller's retry
                await self._slots.acquire()
        else:  # one free: taken at once, without a timer
            await self._slots.acquire()
        try:
            left = max(0.001, timeout_s - (time.perf_counter() - started))
            conn: asyncpg.Connection | None = await self.pool.acquire(timeout=left)
        except BaseException:
            self._slots.release()
            raise
        try:
            yield conn
        except (TimeoutError, asyncio.CancelledError):
            self._hand_back_later(conn)  # as for requests: let the query's cancellation land
            conn = None
            raise
        except asyncpg.QueryCanceledError:  # a statement_timeout: the connection is sound
            raise
        except CONNECTION_ERRORS:
            _drop(conn)
            raise
        finally:
            if conn is not None:
                await self._release(conn)


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
    """Close a broken connection without waiting: a reset would hang on the same dead
    network. (A query that timed out or was cancelled is handed back instead, so that its
    CancelRequest reaches the server: _hand_back_later.)"""
    with contextlib.suppress(asyncpg.InterfaceError):  # already closed and handed back
        conn.terminate()


async def _release(
    pool: asyncpg.Pool, conn: asyncpg.Connection, timeout_s: float | None = None
) -> None:
    try:
        await pool.release(conn, timeout=timeout_s)
    except Exception:  # asyncpg terminated it and returned its slot: a new one replaces it
        log.debug("connection dropped on release", exc_info=True)


def deadline_exceeded(message: str, headers: dict[str, str] | None) -> DeadlineExceeded:
    exc = DeadlineExceeded(message)
    exc.headers = dict(headers or {})  # DeadlineExceeded takes none; a 504 may say when to retry
    return exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
