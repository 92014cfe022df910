"""The prediction log: every answered prediction becomes one row, written exactly once.

Request path: build the row and append it to an in-memory buffer (microseconds, no I/O).
A writer task sends batches with binary COPY every PODSERVE_PREDICTION_LOG_FLUSH_MS or
PODSERVE_PREDICTION_LOG_BATCH_ROWS rows. Database slow or down: the writer retries with
exponential backoff, and once the buffer is full a spiller moves the oldest rows to the
on-disk spool; spooled segments are replayed in order when the database answers again
and at start-up. On shutdown the buffer goes to the database, else to the spool.

Exactly once: COPY goes into a temporary staging table and
`INSERT ... SELECT ... ON CONFLICT (request_id) DO NOTHING` moves it over in the same
transaction, so a batch re-sent after a lost acknowledgement, or a segment replayed twice,
adds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
from asyncpg.exceptions._base import DataError as ClientDataError  # not asyncpg.DataError

from podserve.datatypes import numpy_to_v2
from podserve.db.features import SCHEMA_MISSING
from podserve.db.journal import Journal, forget, recover_dead_journals
from podserve.db.pool import CONNECTION_ERRORS, Database
from podserve.db.spool import ClaimedSegment, Spool, shortage
from podserve.errors import ServiceUnavailable
from podserve.processors import Tensors
from podserve.settings import Settings
from podserve.tracing import background_span

log = logging.getLogger(__name__)

TABLE = "podserve_prediction_log"
STAGE = "podserve_prediction_log_stage"
COLUMNS = (
    "request_id",
    "client_request_id",
    "model",
    "model_version",
    "inputs",
    "inputs_digest",
    "outputs",
    "timings_ms",
    "trace_id",
    "logged_at",
)
_LOGGED_AT = COLUMNS.index("logged_at")
_CLIENT_ID = COLUMNS.index("client_request_id")
_INPUTS = COLUMNS.index("inputs")
_OUTPUTS = COLUMNS.index("outputs")
# The written columns only, their types and nothing else: LIKE copied NOT NULL but not the
# defaults, so a column added the safe way (NOT NULL DEFAULT ...) refused every row in the
# stage. The table's own defaults and constraints apply at the INSERT ... SELECT.
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} ON COMMIT DELETE ROWS AS "
    f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WITH NO DATA"
)
_MOVE_STAGE = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM {STAGE} "
    "ON CONFLICT (request_id) DO NOTHING"
)
INSERT_ONE = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES "
    f"({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))}) ON CONFLICT (request_id) DO NOTHING"
)
SHUTDOWN_FLUSH_S = 1.0  # of the worker's graceful budget, spent trying the database
JOURNAL_RETRY_S = 1.0  # a failing journal (full or read-only volume) is tried again this often
RESCAN_S = 30.0  # look for spool segments of other (dead) workers this often
# SQLSTATE classes of a row's own fault, which retrying the same row cannot cure: 22 data
# exception (a value the column refuses), 23 integrity constraint violation (NOT NULL, CHECK,
# a foreign key). Such rows are found by halving the batch and set aside. Class 42 (a column
# missing until a migration runs, one of another type, a missing GRANT) is the table's or the
# grants' state, an operator's to fix: its rows are kept and retried, as in an outage, and so
# are those of every other class (08 connection, 25 read-only after a failover, 40
# serialization, 53 resources, 55 lock, 57 cancelled or shut down, ...).
ROW_ERROR_CLASSES = frozenset({"22", "23"})
# Class 23, but the table's state: a NOT NULL column this version does not write, or writes
# null (a migration ahead of the code, an operator's ALTER): every row fails alike.
NOT_NULL_VIOLATION = "23502"
SET_ASIDE_IDS_KEPT = 10_000  # ids remembered so a retried batch is not set aside twice
UNDEFINED_TABLE = "42P01"  # class 42 too, but its hint is SCHEMA_MISSING
SCHEMA_MISMATCH = (
    "the prediction-log table does not match this podserve version (or its grants): "
    "run `podserve db migrate`, or check the role's privileges"
)


class SchemaMismatch(Exception):
    """A write the table's state refuses whatever its rows hold, even on a fresh staging
    table (class 42, or a value the codec of its column's type cannot take): the rows are
    kept and retried with backoff until an operator fixes the table or the grants."""


# A replay that fails for the database's state (down, slow, a bad connection, a server-side
# error that retrying may cure) or the table's (SchemaMismatch) keeps its segment for a
# retry: its rows can still be written.
# Anything else (a row of another layout: IndexError, TypeError; a read error) is the
# segment's own fault and would fail the same way for ever: the segment is quarantined. But
# a `shortage` (EMFILE, ENOMEM, ...) at any step is the process's state: the segment is kept.
TRANSIENT_REPLAY_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,  # OSError: TimeoutError too
    ServiceUnavailable,
    asyncpg.PostgresError,
    SchemaMismatch,
)
_JSON = orjson.OPT_SERIALIZE_NUMPY

# A row is a JSON-native list (so the spool can store it as is); logged_at is epoch seconds.
Row = list[Any]


def make_row(
    request_id: str,
    client_request_id: str | None,
    model: str,
    version: str,
    inputs: Tensors,
    outputs: Tensors,
    timings_s: dict[str, float],
    trace_id: str | None,
    inputs_mode: str,
) -> Row:
    full = inputs_mode == "full"
    return [
        request_id,
        None if client_request_id is None else pg_text(client_request_id[:CLIENT_ID_MAX_CHARS]),
        model,
        version,
        orjson.dumps(_tensors_json(inputs), option=_JSON).decode() if full else None,
        None if full else tensors_digest(inputs),
        orjson.dumps(_tensors_json(outputs), option=_JSON).decode(),
        orjson.dumps({k: round(v * 1000, 3) for k, v in timings_s.items()}).decode(),
        trace_id,
        time.time(),
    ]


# A client's own request id (X-Request-Id; a job's `id`) is kept to this many characters: a
# header may be 64 KiB and a job's `id` megabytes, each stored with every row and held in the
# buffer meanwhile. Ids are UUIDs or trace ids in practice, well under it.
CLIENT_ID_MAX_CHARS = 256


def pg_text(text: str) -> str:
    """Text PostgreSQL accepts: it refuses U+0000 in text and jsonb alike (one such row would
    fail its whole batch), so it becomes U+FFFD, as undecodable bytes do."""
    return text.replace("\x00", "\ufffd")


def new_request_id() -> str:
    return str(uuid.uuid4())


def _tensors_json(tensors: Tensors) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, array in tensors.items():
        flat = np.ascontiguousarray(array).reshape(-1)
        if flat.dtype.kind in "OSU":  # BYTES: strings, or bytes decoded
            data: Any = [
                pg_text(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
                for v in flat
            ]
        elif flat.dtype == np.float16:
            data = flat.astype(np.float32)
        elif not flat.dtype.isnative:
            data = flat.astype(flat.dtype.newbyteorder("="))
        else:
            data = flat
        out[name] = {"datatype": numpy_to_v2(array.dtype), "shape": list(array.shape), "data": data}
    return out


def tensors_digest(tensors: Tensors) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal inputs, equal digest."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        if array.dtype.kind == "O":
            for value in array.reshape(-1):
                raw = value if isinstance(value, bytes) else str(value).encode()
                digest.update(len(raw).to_bytes(4, "little") + raw)
        else:
            digest.update(array.tobytes())
    return digest.hexdigest()


# What a row holds in memory besides its inputs, outputs and client id: the list, the uuid,
# digest, timings and trace id strings (each with a ~50-byte header), the float, the deque
# slot and the journal's pending entry. Measured (tracemalloc, make_row in digest mode):
# ~540 bytes, ~640 with the pending entry. The bound need not be exact, only follow memory.
ROW_OVERHEAD_BYTES = 640


def row_bytes(row: Row) -> int:
    """About the memory a buffered row holds: its variable text's length (from the strings
    make_row already built, not re-encoded: this runs on every request) plus a constant.
    A row's size never changes, so adding it in and taking it out again stays exact."""
    inputs, client_id = row[_INPUTS], row[_CLIENT_ID]
    size = ROW_OVERHEAD_BYTES + len(row[_OUTPUTS])
    if inputs is not None:
        size += len(inputs)
    if client_id is not None:
        size += len(client_id)
    return size


def row_error(exc: BaseException) -> bool:
    """Whether a write failed for a row's own values (classes 22 and 23 but a NOT NULL
    violation, or a value asyncpg cannot encode: its client-side DataError): the same row
    fails for ever, the others not."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in ROW_ERROR_CLASSES and state != NOT_NULL_VIOLATION
    return isinstance(exc, ClientDataError)


def statement_error(exc: BaseException) -> bool:
    """Whether a write failed for the table's or the grants' state, whatever its rows hold:
    class 42 but a missing table (a column missing or of another type, a missing GRANT), a
    NOT NULL violation, or the TypeError/ValueError of asyncpg's binary codecs (a column of
    another type)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return (state.startswith("42") and state != UNDEFINED_TABLE) or state == NOT_NULL_VIOLATION
    return isinstance(exc, TypeError | ValueError) and not isinstance(exc, asyncpg.InterfaceError)


def error_text(exc: BaseException) -> str:
    """A failed write's reason for its log line: what to do, where that is known."""
    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"{SCHEMA_MISSING} ({exc!r})"
    if isinstance(exc, SchemaMismatch):
        return str(exc)
    return repr(exc)


def check_layout(rows: Sequence[Row]) -> None:
    """Raise (ValueError, IndexError, TypeError) for a row of another layout than COLUMNS (a
    spooled segment's own fault, quarantined), told apart from a column that refuses a good
    row: a codec's TypeError on a row of this layout is the table's state, retried."""
    for row in rows:
        if len(row) != len(COLUMNS):
            raise ValueError(f"a spooled row of {len(row)} values, not {len(COLUMNS)}")
        for name, value in zip(COLUMNS[:_LOGGED_AT], row, strict=False):  # text and jsonb
            if value is not None and not isinstance(value, str):
                raise TypeError(f"a spooled row's {name} is a {type(value).__name__}, not text")
        to_record(row)


def to_record(row: Row) -> tuple[Any, ...]:
    """A buffered/spooled row as asyncpg wants it (timestamptz needs a datetime)."""
    record = list(row)
    record[_LOGGED_AT] = datetime.fromtimestamp(row[_LOGGED_AT], UTC)
    return tuple(record)


class PredictionLog:
    def __init__(self, db: Database, spool: Spool, settings: Settings) -> None:
        self.db = db
        self.spool = spool
        self.capacity = settings.prediction_log_buffer_rows
        # The same bound in bytes (row_bytes): big rows spill, and are refused, at the byte
        # bound long before the row bound. A batch (one COPY) takes at most a quarter of it.
        self.capacity_bytes = settings.prediction_log_buffer_bytes
        self.batch_bytes = max(1, self.capacity_bytes // 4)
        self.batch_rows = settings.prediction_log_batch_rows
        self.flush_s = settings.prediction_log_flush_ms / 1000
        self.max_backoff_s = settings.prediction_log_max_backoff_s
        self.write_timeout_s = settings.db_command_timeout_s + settings.db_connect_timeout_s
        self._begin_sql = f"{db.bound_transaction_sql}; {_CREATE_STAGE}"  # one round trip
        self._fresh_begin_sql = (
            f"{db.bound_transaction_sql}; DROP TABLE IF EXISTS {STAGE}; {_CREATE_STAGE}"
        )
        self.inputs_mode = settings.prediction_log_inputs
        self._full_headers = {"Retry-After": str(settings.retry_after_s)}  # for the 503
        # Whether the last spill failed: a full buffer then means a failing spool, else one
        # that is behind (rows arriving faster than a spill's fsync: measured up to ~0.2 s on
        # a loaded disk), and the 503 says which.
        self._spill_failing = False
        self.buffer: deque[Row] = deque()
        self.buffer_bytes = 0  # row_bytes of the rows in self.buffer, kept with every move
        # Crash safety: each buffered row is also in the journal until it is durable.
        journal_on = settings.prediction_log_journal
        self.journal = Journal(spool.directory / "journal") if journal_on else None
        self._pending: dict[str, int] = {}  # request id -> journal seq, until durable
        # Journal degraded (its volume full or read-only): rows are kept in memory only
        # (buffer, then spool or database as usual) and the journal is tried again from
        # this monotonic time on. 0.0: healthy (one attribute test on the request path).
        self._journal_retry_at = 0.0
        self.journal_errors = 0  # failed journal writes (also counted in write_errors)
        self.rows_unjournaled = 0  # rows buffered while the journal was failing
        self.rows_recovered = 0  # rows of dead workers' journals moved to the spool
        self._inflight: list[Row] = []  # the batch being written (out of the buffer)
        # Running totals: rows_written, rows_spooled, rows_rejected and write_errors are
        # exported (metrics.PREDICTION_LOG_TOTALS); rows_duplicate and rows_replayed are
        # kept for the tests.
        self.rows_written = 0  # inserted into PostgreSQL by this worker
        self.rows_duplicate = 0  # re-sent rows the database already had
        self.rows_spooled = 0
        self.rows_replayed = 0  # read back from the spool and written
        self.rows_rejected = 0  # refused by PostgreSQL for their values: set aside on disk
        self._set_aside_ids: set[str] = set()  # a batch retried after a later failure
        self.write_errors = 0
        self.failures = 0  # consecutive failed write attempts (0: healthy)
        # The spool's replay fails and backs off on its own: the live buffer drains whatever
        # a segment does (a bad one must not stop every row behind it).
        self.replay_failures = 0  # consecutive failed replays (0: healthy)
        self._replay_retry_at = 0.0  # monotonic time of the next replay after a failure
        self.segments_quarantined = 0  # segments set aside as .quarantined (or skipped)
        self._skipped_segments: set[Path] = set()  # could not even be renamed aside
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._spool_pending = False
        self._next_rescan = time.monotonic() + RESCAN_S
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._spiller: asyncio.Task[None] | None = None

    # --- metrics ---------------------------------------------------------------------
    @property
    def buffer_depth(self) -> int:
        return len(self.buffer)

    @property
    def spool_bytes(self) -> int:
        return self.spool.bytes

    # --- request path ----------------------------------------------------------------
    def append(self, row: Row) -> None:
        """O(1), no I/O. Full twice over (rows or bytes) means the spool cannot keep up:
        refuse to answer."""
        depth, size = len(self.buffer), self.buffer_bytes
        if depth >= 2 * self.capacity or size >= 2 * self.capacity_bytes:
            raise ServiceUnavailable(self._full_reason(), self._full_headers)
        if self.journal is not None:
            self._journal(row)
        self.buffer.append(row)
        depth += 1
        size += row_bytes(row)
        self.buffer_bytes = size
        if depth >= self.capacity or size >= self.capacity_bytes:
            self._full.set()
        elif (depth >= self.batch_rows or size >= self.batch_bytes) and self.failures == 0:
            self._wake.set()

    def _full_reason(self) -> str:
        if self._spill_failing:
            return "prediction log is full (database and spool both failing)"
        return (
            "prediction log is full (database not taking rows, and the spool to disk is "
            "behind them)"
        )

    # --- moving rows out of (and back into) the buffer, bytes counted ------------------
    def _take_batch(self) -> list[Row]:
        """The oldest rows, up to batch_rows and batch_bytes (at least one row)."""
        batch: list[Row] = []
        size = 0
        while self.buffer and len(batch) < self.batch_rows and size < self.batch_bytes:
            row = self.buffer.popleft()
            size += row_bytes(row)
            batch.append(row)
        self.buffer_bytes -= size
        return batch

    def _take_to_spill(self) -> list[Row]:
        """The oldest rows, until half the buffer's row and byte bounds are left."""
        rows_left, bytes_left = self.capacity // 2, self.capacity_bytes // 2
        taken: list[Row] = []
        while self.buffer and (len(self.buffer) > rows_left or self.buffer_bytes > bytes_left):
            row = self.buffer.popleft()
            self.buffer_bytes -= row_bytes(row)
            taken.append(row)
        return taken

    def _put_back(self, rows: list[Row]) -> None:
        """Rows that could not be written or spooled: back in front, order kept. Over the
        bound again, the spiller is woken: an append would, but not one refused at twice
        the bound, where a failed batch larger than the bound left every append refused
        (and the spool unused) until the database came back."""
        self.buffer.extendleft(reversed(rows))
        self.buffer_bytes += sum(map(row_bytes, rows))
        if self._over_capacity():
            self._full.set()

    def _over_capacity(self) -> bool:
        return len(self.buffer) >= self.capacity or self.buffer_bytes >= self.capacity_bytes

    def _journal(self, row: Row) -> None:
        """Crash safety for a row, best effort: a journal that cannot be written must not
        fail the prediction (the row is in the buffer, as it was before journals existed)."""
        assert self.journal is not None
        if self._journal_retry_at and time.monotonic() < self._journal_retry_at:
            self.rows_unjournaled += 1
            return
        try:
            self._pending[row[0]] = self.journal.append(row)
        except OSError as exc:
            self._journal_failed(exc)
            self.rows_unjournaled += 1
            return
        if self._journal_retry_at:
            self._journal_retry_at = 0.0
            log.warning(
                "prediction-log journal writable again",
                extra={"rows_not_journaled": self.rows_unjournaled},
            )

    def _journal_failed(self, exc: OSError) -> None:
        self.journal_errors += 1
        self.write_errors += 1  # exported as podserve_prediction_log_write_errors_total
        if not self._journal_retry_at:  # once per episode, not once per request
            log.error(
                "cannot write the prediction-log journal; rows are kept in memory only "
                "(not crash-safe) until it can be written again",
                extra={"error": repr(exc), "retry_s": JOURNAL_RETRY_S},
            )
        self._journal_retry_at = time.monotonic() + JOURNAL_RETRY_S

    # --- lifecycle -------------------------------------------------------------------
    def _mark_durable(self, rows: Iterable[Row]) -> None:
        """These rows are in PostgreSQL or the spool: their journal copies may go."""
        if self.journal is None:
            return
        for row in rows:
            self._pending.pop(row[0], None)
        self.journal.release(min(self._pending.values(), default=self.journal.next_seq))

    def _recover_journals(self) -> int:
        """Blocking: journals of dead (e.g. SIGKILLed) workers become spool segments."""
        if self.journal is None:
            return 0
        recovered = 0
        found = recover_dead_journals(self.journal.directory)
        try:
            while found:
                path, rows, fd = found[0]
                if rows:
                    self.spool.write(rows)
                del found[0]
                forget(path, fd)
                recovered += len(rows)
        finally:  # not spooled (EMFILE, a full volume): unlocked, recovered on a later pass
            for _, _, fd in found:
                os.close(fd)
        if recovered:
            log.warning(
                "prediction rows recovered from a dead worker's journal", extra={"rows": recovered}
            )
        return recovered

    async def start(self) -> None:
        await asyncio.to_thread(self.spool.open)
        if self.journal is not None:
            await asyncio.to_thread(self._open_journal)
        # Earlier runs (or dead workers' journals) left rows: replay them first.
        self._spool_pending = bool(self.spool.bytes) or self.rows_recovered > 0
        self._writer = asyncio.create_task(self._write_forever(), name="prediction-log-writer")
        self._spiller = asyncio.create_task(self._spill_forever(), name="prediction-log-spiller")

    def _open_journal(self) -> None:
        """A volume that is full or read-only keeps the journal from working, not the worker
        from starting (a recycled worker would stop the pod): rows are kept in memory, as
        when the journal fails later, and dead workers' journals wait for another worker."""
        assert self.journal is not None
        try:
            self.journal.open()
        except OSError as exc:
            self._journal_failed(exc)
            return
        try:
            self.rows_recovered += self._recover_journals()
        except OSError as exc:
            log.error(
                "cannot recover dead workers' prediction-log journals now; they stay on disk",
                extra={"error": repr(exc)},
            )

    async def close(self) -> None:
        """Shutdown (no more appends): to the database if it answers in time, else the spool.

        Every wait is bounded: a write stuck on a dead network is abandoned, not awaited, and
        its batch is spooled as well (replaying a row the database already has is a no-op).
        """
        self._closing = True
        if self._spiller is not None:
            self._full.set()
            await asyncio.wait({self._spiller}, timeout=2.0)  # lets a spill in progress end
        stranded: list[Row] = []  # the batch of a write that did not stop in time
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait({self._writer}, timeout=0.2)
            if not self._writer.done():
                stranded, self._inflight = self._inflight, []
        if self.buffer and self.failures == 0 and not stranded:
            flush = asyncio.ensure_future(self._drain_buffer())
            await asyncio.wait({flush}, timeout=SHUTDOWN_FLUSH_S)
            if not flush.done():
                flush.cancel()
            elif flush.exception() is not None:
                log.warning("prediction log flush failed", extra={"error": repr(flush.exception())})
        rows = [*stranded, *self._inflight, *self.buffer]
        self.buffer.clear()
        self.buffer_bytes = 0
        try:
            await self._spool_at_shutdown(rows)
        finally:
            if self.journal is not None:  # rows not made durable stay for the next worker
                self.journal.close(all_durable=not self._pending)

    async def _spool_at_shutdown(self, rows: list[Row]) -> None:
        if not rows:
            return
        try:
            await asyncio.to_thread(self.spool.write, rows)
        except (OSError, TypeError, ValueError):
            log.exception(
                "prediction-log rows not spooled at shutdown; kept in the journal",
                extra={"rows": len(rows)},
            )
            return
        self._mark_durable(rows)
        self.rows_spooled += len(rows)
        log.warning("prediction log spooled at shutdown", extra={"rows": len(rows)})

    # --- writer ----------------------------------------------------------------------
    async def _write_forever(self) -> None:
        while True:
            if time.monotonic() >= self._next_rescan:  # segments other workers left behind
                self._next_rescan = time.monotonic() + RESCAN_S
                self._spool_pending = True
            replay_failed = False
            if self._spool_pending and time.monotonic() >= self._replay_retry_at:
                replay_failed = await self._replay_with_backoff()
            drain_failed = await self._drain_with_backoff()
            if replay_failed or drain_failed:  # one pass, one cause: counted once
                self.write_errors += 1
            await self._sleep(self._backoff_s() if self.failures else self.flush_s)

    async def _drain_with_backoff(self) -> bool:
        """Drain the buffer; True if it failed (the database down, slow, or a bad connection:
        retried later with backoff; rows no retry can write are set aside instead)."""
        try:
            await self._drain_buffer()
        except Exception as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 20 == 0:
                log.warning(
                    "prediction log write failed; retrying with backoff",
                    extra={
                        "error": error_text(exc),
                        "failures": self.failures,
                        "buffered": len(self.buffer),
                    },
                )
            return True
        if self.failures:
            log.info("prediction log writing again", extra={"after": self.failures})
        self.failures = 0
        return False

    async def _replay_with_backoff(self) -> bool:
        """Replay the spool; True if it failed (the database's state, as a bad segment is
        quarantined): logged and retried with its own backoff, never stopping the buffer's
        drain."""
        try:
            await self._replay_spool()
        except Exception as exc:
            self.replay_failures += 1
            self._replay_retry_at = time.monotonic() + self._backoff_s(self.replay_failures)
            if self.replay_failures == 1 or self.replay_failures % 20 == 0:
                log.warning(
                    "prediction-log spool replay failed; retrying with backoff",
                    extra={"error": error_text(exc), "failures": self.replay_failures},
                )
            return True
        if self.replay_failures:
            log.info("prediction-log spool replaying again", extra={"after": self.replay_failures})
        self.replay_failures = 0
        self._replay_retry_at = 0.0
        return False

    def _backoff_s(self, failures: int | None = None) -> float:
        failures = self.failures if failures is None else failures
        return min(self.max_backoff_s, 0.1 * 2 ** min(failures - 1, 16))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _drain_buffer(self) -> None:
        while self.buffer:
            batch = self._take_batch()
            self._inflight = batch
            try:
                await self._write_or_set_aside(batch)
            except BaseException:
                self._put_back(batch)
                raise
            finally:
                self._inflight = []
            self._mark_durable(batch)

    async def write(self, rows: Sequence[Row], fresh_stage: bool = False) -> int:
        """One batch, idempotently; returns the rows that were new to the database.
        `fresh_stage`: make the connection's staging table again, from the table as it is
        now, and drop asyncpg's cached statements (the column types its COPY encodes for):
        a migration may have changed a column since the connection made them."""
        # One trace for the write's statements, not a lone trace per statement.
        span = background_span("prediction_log.write", {"podserve.rows": len(rows)})
        begin = self._fresh_begin_sql if fresh_stage else self._begin_sql
        async with asyncio.timeout(self.write_timeout_s):
            with span:
                async with self.db.background(self.write_timeout_s) as conn, conn.transaction():
                    if fresh_stage:  # the pool's caches dropped: no I/O
                        await conn.reload_schema_state()
                    await conn.execute(begin)
                    await conn.copy_records_to_table(
                        STAGE, records=map(to_record, rows), columns=COLUMNS
                    )
                    status = await conn.execute(_MOVE_STAGE)
        inserted = int(status.rsplit(" ", 1)[-1])
        self.rows_written += inserted
        self.rows_duplicate += len(rows) - inserted
        return inserted

    async def _write_or_set_aside(self, rows: Sequence[Row]) -> None:
        """`write`, but rows no retry can write (row_error: the same rows would fail for
        ever, and hold up every row behind them) are set aside on disk, counted in
        rows_rejected, and the others are written. Any other error is raised (a statement
        error as SchemaMismatch): the caller keeps every row of the batch for a retry."""
        unwritable: list[tuple[Row, str]] = []
        await self._write_or_find_unwritable(rows, unwritable)
        if unwritable:
            await self._set_aside(unwritable)

    async def _write_or_find_unwritable(
        self, rows: Sequence[Row], unwritable: list[tuple[Row, str]]
    ) -> None:
        """Rows refused for their values are found by halving the batch (the rows around
        them are written). A statement error is tried once more on a staging table made from
        the table as it is now (the connection's may be from before a migration)."""
        try:
            await self.write(rows)
            return
        except Exception as exc:
            if not (row_error(exc) or statement_error(exc)):
                raise
            error: Exception | None = exc
        if statement_error(error):
            error = await self._write_on_fresh_stage(rows)
            if error is None:
                return
        if len(rows) == 1:
            unwritable.append((rows[0], repr(error)))
            return
        half = len(rows) // 2
        await self._write_or_find_unwritable(rows[:half], unwritable)
        await self._write_or_find_unwritable(rows[half:], unwritable)

    async def _write_on_fresh_stage(self, rows: Sequence[Row]) -> Exception | None:
        """`write` on a fresh staging table: None once written, a row error to halve on. A
        statement error again is the table's or the grants' state, not the rows': raised as
        SchemaMismatch, a transient failure (the rows are kept and retried with backoff,
        not set aside in an unbounded pile) whose warning tells the operator what to do."""
        try:
            await self.write(rows, fresh_stage=True)
        except Exception as exc:
            if statement_error(exc):
                raise SchemaMismatch(f"{SCHEMA_MISMATCH} ({exc!r})") from exc
            if not row_error(exc):
                raise
            return exc
        return None

    async def _set_aside(self, unwritable: list[tuple[Row, str]]) -> None:
        """One `.rejected` file per distinct error (rows a constraint refuses alike: one
        file for them, not one per row); a row set aside before its batch was retried
        (after a later transient failure) is not set aside twice."""
        by_error: dict[str, list[Row]] = {}
        for row, error in unwritable:
            if row[0] not in self._set_aside_ids:
                by_error.setdefault(error, []).append(row)
        for error, rows in by_error.items():
            path = await asyncio.to_thread(self.spool.set_aside, rows, error)
            if len(self._set_aside_ids) > SET_ASIDE_IDS_KEPT:  # bounded: at worst a dup
                self._set_aside_ids.clear()
            self._set_aside_ids.update(row[0] for row in rows)
            self.rows_rejected += len(rows)
            log.error(
                "prediction-log rows the database refuses for good; set aside in the spool "
                "directory",
                extra={
                    "rows": len(rows),
                    "request_id": rows[0][0],
                    "error": error,
                    "set_aside_as": str(path),
                },
            )

    async def _replay_spool(self) -> None:
        """Oldest segment first. A spill during the replay sets the flag again."""
        self._spool_pending = False
        try:
            self.rows_recovered += await asyncio.to_thread(self._recover_journals)
            for path in await asyncio.to_thread(self.spool.segments):
                if path not in self._skipped_segments:
                    await self._replay_segment(path)
        except BaseException:
            self._spool_pending = True
            raise
        await asyncio.to_thread(self.spool.measure)  # the gauge: what is on disk now

    async def _replay_segment(self, path: Path) -> None:
        claimed = await asyncio.to_thread(self.spool.claim, path)
        if claimed is None:
            return  # another worker is replaying it
        try:
            rows: list[Row] | None = None
            written = 0  # rows of its chunks written (or set aside) before a failure
            try:
                rows = await asyncio.to_thread(claimed.read)
                for chunk in _chunks(rows, self.batch_rows):
                    check_layout(chunk)  # the segment's fault, not a column's: quarantined
                    await self._write_or_set_aside(chunk)
                    written += len(chunk)
            except Exception as exc:
                if shortage(exc) or (rows is not None and isinstance(exc, TRANSIENT_REPLAY_ERRORS)):
                    raise  # the process's or the database's state: kept for a retry
                # Reading the file failed, or its rows are of another layout: its own fault.
                unwritten = None if rows is None else len(rows) - written
                await self._quarantine(claimed, exc, "read" if rows is None else "write", unwritten)
                return
            try:
                await asyncio.to_thread(claimed.remove)
            except Exception as exc:  # written, but it stays: must not be claimed for ever
                if shortage(exc):
                    raise  # kept, replayed again later: its rows are in, a no-op
                await self._quarantine(claimed, exc, "remove", 0)
                return
            self.rows_replayed += len(rows)
            log.info(
                "spooled prediction rows replayed", extra={"rows": len(rows), "segment": path.name}
            )
        finally:
            await asyncio.to_thread(claimed.close)

    async def _quarantine(
        self, claimed: ClaimedSegment, exc: Exception, step: str, unwritten: int | None
    ) -> None:
        """A segment whose replay fails for its own sake (not the database's) would be claimed
        again every pass, for ever: it is renamed `.quarantined` (never replayed, an operator's
        to look at); if even that fails, this process skips it for the rest of its life. A
        rename that fails for a `shortage` is raised instead: tried again on a later pass.
        `unwritten`: its rows not yet written (None: the file could not be read)."""
        extra: dict[str, Any] = {"segment": str(claimed.path), "step": step, "error": repr(exc)}
        if unwritten is not None:
            extra["rows_unwritten"] = unwritten
        try:
            aside = await asyncio.to_thread(claimed.quarantine)
        except Exception as rename_exc:
            if shortage(rename_exc):
                raise
            self._count_quarantined(unwritten)
            self._skipped_segments.add(claimed.path)
            extra["rename_error"] = repr(rename_exc)
            log.error(
                "prediction-log spool segment cannot be replayed nor set aside; this worker "
                "skips it from now on",
                extra=extra,
            )
            return
        self._count_quarantined(unwritten)
        extra["quarantined_as"] = str(aside)
        log.error("prediction-log spool segment cannot be replayed; quarantined", extra=extra)

    def _count_quarantined(self, unwritten: int | None) -> None:
        self.segments_quarantined += 1
        self.write_errors += 1  # exported as podserve_prediction_log_write_errors_total
        if unwritten:
            self.rows_rejected += unwritten  # set aside on disk, in the quarantined file

    # --- spiller ---------------------------------------------------------------------
    async def _spill_forever(self) -> None:
        while not self._closing:
            await self._full.wait()
            self._full.clear()
            while self._over_capacity() and not self._closing:
                if not await self._spill():
                    await asyncio.sleep(1.0)  # the disk failed: try again shortly
                    self._full.set()
                    break

    async def _spill(self) -> bool:
        rows = self._take_to_spill()
        try:
            await asyncio.to_thread(self.spool.write, rows)
        except Exception as exc:  # a full or read-only disk: keep the rows, try again later
            self._spill_failing = True
            self._put_back(rows)
            log.error("cannot write the prediction-log spool", extra={"error": repr(exc)})
            return False
        self._spill_failing = False
        self._mark_durable(rows)
        self.rows_spooled += len(rows)
        self._spool_pending = True
        log.warning(
            "prediction log buffer full: rows spooled to disk",
            extra={
                "rows": len(rows),
                "buffer_rows": len(self.buffer),
                "buffer_bytes": self.buffer_bytes,
                "spool_bytes": self.spool.bytes,
            },
        )
        return True


def _chunks(rows: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
