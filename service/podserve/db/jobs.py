"""Durable background inference jobs in PostgreSQL.

A job row holds the request body exactly as POSTed. Workers claim jobs with
`FOR UPDATE SKIP LOCKED` and hold a lease (`lease_expires_at`, renewed while running); a
job whose worker died is claimed again once its lease runs out. Completion is a
conditional UPDATE on (lease_owner, attempts): only the holder of the current lease can
store a result, so however often a job's inference ran, its result is stored once and the
job turns `succeeded` once. The prediction-log row of a job is written in the same
transaction, keyed by the job id.

Inference runs in the worker's inference pool at BACKGROUND priority, not through the
batcher: online batches always get the next free thread, and job rows do not count
against the online admission budget (a backlog of jobs never turns clients away). A job
of a model the batcher merges requests for runs in pieces of its max_batch_size rows, each
a session run of its own, so that an online batch waits at most one piece for the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import onnxruntime as ort
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from podserve import connection_balance
from podserve.db.features import SCHEMA_MISSING, FeatureStore, entity_lookup, schema_missing
from podserve.db.pool import CONNECTION_ERRORS, Database
from podserve.db.prediction_log import INSERT_ONE, Row, make_row, to_record
from podserve.errors import Overloaded, PayloadTooLarge, PodserveError, ServiceUnavailable
from podserve.http_body import PARSE_ON_LOOP_MAX_BYTES, parse_body
from podserve.inference_pool import BACKGROUND
from podserve.pieces import join_pieces, piece_rows, slice_rows
from podserve.processors import Tensors
from podserve.protocol_v2 import (
    InferRequest,
    classification_is_large,
    encode_infer_response,
    parse_infer_request,
)
from podserve.settings import Settings
from podserve.tracing import background_span, current_trace_id, phase_span

if TYPE_CHECKING:
    from podserve.onnx_model import OnnxModel
    from podserve.runtime import ServingRuntime

log = logging.getLogger(__name__)

# A running job's run_after is always in the past: a job is claimed only once its run_after
# has passed, and only a requeue (back to 'queued') moves it. So `run_after <= now()` holds
# for both kinds of claimable rows (queued ones due, running ones whose lease ran out) and
# bounds the scan of podserve_jobs_claimable (migration 0002) to the claimable prefix, in
# claim order: the claim locks the first free rows it meets and stops, where it used to
# sort every candidate (58 ms per claim with 200k jobs queued; 0.4 ms now). The error of a
# job whose lease ran out says so: if it never finishes, its final error names the cause.
_CLAIM = """
WITH next AS (
    SELECT id FROM podserve_jobs
    WHERE status IN ('queued', 'running') AND run_after <= now()
      AND (status = 'queued' OR lease_expires_at < now())
    ORDER BY run_after, created_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE podserve_jobs AS j
SET status = 'running', attempts = j.attempts + 1, lease_owner = $2,
    lease_expires_at = now() + make_interval(secs => $3),
    started_at = coalesce(j.started_at, now()),
    error = CASE WHEN j.status = 'running'
                 THEN 'the lease of ' || j.lease_owner || ' ran out (worker gone or cut off)'
                 ELSE j.error END
FROM next WHERE j.id = next.id
RETURNING j.id, j.model, j.model_version, j.body, j.json_length, j.attempts, j.error
"""
_MINE = "id = $1 AND status = 'running' AND lease_owner = $2 AND attempts = $3"
_SUCCEED = f"""
UPDATE podserve_jobs SET status = 'succeeded', result = $4, error = NULL, finished_at = now(),
    expires_at = now() + make_interval(secs => $5), lease_owner = NULL, lease_expires_at = NULL
WHERE {_MINE}
"""
_FAIL = f"""
UPDATE podserve_jobs SET status = 'failed', error = $4, finished_at = now(),
    expires_at = now() + make_interval(secs => $5), lease_owner = NULL, lease_expires_at = NULL,
    attempts = attempts - $6
WHERE {_MINE}
"""
_REQUEUE = f"""
UPDATE podserve_jobs SET status = 'queued', run_after = now() + make_interval(secs => $4),
    attempts = attempts - $5, error = coalesce($6, error), lease_owner = NULL,
    lease_expires_at = NULL
WHERE {_MINE}
"""
# Per attempt: an execution that lost its lease and was claimed again (by this worker too)
# must not keep the live attempt's lease, nor the live one lose its renewals to the stale
# one. SKIP LOCKED: a row being finished (a large result is stored for seconds, holding the
# row) needs no renewal, and waiting on it would hold up every other lease past the timeout.
_RENEW = """
WITH mine AS (
    SELECT j.id FROM podserve_jobs AS j
    JOIN unnest($1::uuid[], $2::integer[]) AS live(id, attempts)
        ON j.id = live.id AND j.attempts = live.attempts
    WHERE j.status = 'running' AND j.lease_owner = $3
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE podserve_jobs AS j SET lease_expires_at = now() + make_interval(secs => $4)
FROM mine WHERE j.id = mine.id
RETURNING j.id, j.attempts
"""
# Of the leases _RENEW skipped, those definitely not ours any more: claimed again (another
# owner or attempt), finished or gone. Not locking: a row our own store holds reads as ours.
_LOST = """
SELECT live.id, live.attempts FROM unnest($1::uuid[], $2::integer[]) AS live(id, attempts)
WHERE NOT EXISTS (
    SELECT 1 FROM podserve_jobs AS j
    WHERE j.id = live.id AND j.attempts = live.attempts AND j.status = 'running'
      AND j.lease_owner = $3)
"""
PURGE_BATCH = 1000  # rows per DELETE: short statements, short locks
PURGE_PASS_S = 5.0  # a pass deletes batches until one comes back short, or for this long
# SKIP LOCKED: workers purging at once delete different rows instead of waiting on each other.
_PURGE = f"""
DELETE FROM podserve_jobs WHERE id IN (
    SELECT id FROM podserve_jobs WHERE expires_at < now() LIMIT {PURGE_BATCH}
    FOR UPDATE SKIP LOCKED)
"""
# For the podserve_jobs_pending gauge: two index-only scans of the partial indexes
# podserve_jobs_queued and podserve_jobs_leases (~20 ms with 200k jobs queued and 200k
# finished; one count over both statuses read the heap: 64 ms).
_COUNT = """
SELECT (SELECT count(*) FROM podserve_jobs WHERE status = 'queued') AS queued,
       (SELECT count(*) FROM podserve_jobs WHERE status = 'running') AS running
"""
_GET = """
SELECT id, model, model_version, status, attempts, result, error,
       created_at, started_at, finished_at, expires_at
FROM podserve_jobs WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
"""
# Unless PODSERVE_JOBS_MAX_QUEUED jobs are queued already (counted on the podserve_jobs_queued
# index, at most that many entries): a flood of submissions must not grow the table without
# bound while the workers fall behind. Concurrent submissions may overshoot by a few.
_INSERT = """
INSERT INTO podserve_jobs (id, model, model_version, body, json_length)
SELECT $1, $2, $3, $4, $5
WHERE $6::integer = 0 OR (
    SELECT count(*) FROM (SELECT FROM podserve_jobs WHERE status = 'queued' LIMIT $6) AS queued
) < $6
"""
# A result's statements get PODSERVE_DB_COMMAND_TIMEOUT_S (sized for lookups) plus a second
# per this many bytes: PostgreSQL took 0.5-8 s to store 64-170 MiB results (TOAST
# compression) and 3-7 s to parse their prediction-log row (jsonb) on the 2-core dev machine.
STORE_BYTES_PER_S = 4 * 2**20
STORE_CLIENT_SLACK_S = 1.0  # asyncpg's timeout, after PostgreSQL's (see JobStore.succeed)
# Output tensors up to this size are encoded as JSON (and logged) on the event loop (~1 ms);
# larger ones in a thread, as large request bodies are parsed (http_body.parse_body).
ENCODE_ON_LOOP_MAX_BYTES = PARSE_ON_LOOP_MAX_BYTES // 4
# Errors of storing a result that say nothing about the job: retried (or the lease runs out).
# Any other (a value PostgreSQL refuses, a size limit) would recur: the job fails at once.
TRANSIENT_STORE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,  # TimeoutError and the server's query cancellation included
    ServiceUnavailable,
    asyncpg.TransactionRollbackError,  # deadlock, serialization failure
)


@dataclass
class ClaimedJob:
    id: uuid.UUID
    model: str
    version: str | None
    body: bytes
    json_length: int | None
    attempts: int
    last_error: str | None = None  # of an earlier attempt: why it was retried


@dataclass(eq=False)
class Execution:
    """One attempt of a job in this worker."""

    job: ClaimedJob
    # The session run's options: stop() sets `terminate` so the inference thread lets go.
    run_options: ort.RunOptions = field(default_factory=ort.RunOptions)
    # While True, the renewer may terminate the run on a lost lease; afterwards the
    # attempt writes its outcome (which the database then rightly no longer calls ours).
    computing: bool = False
    lease_lost: bool = False  # the renewer found the job claimed again, finished or gone

    @property
    def key(self) -> tuple[uuid.UUID, int]:
        return self.job.id, self.job.attempts


class JobStore:
    """The SQL of jobs; every method takes one connection from the pool."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.timeout_s = settings.db_command_timeout_s + settings.db_connect_timeout_s
        self.command_timeout_s = settings.db_command_timeout_s
        self.lease_s = settings.jobs_lease_s
        self.ttl_s = settings.jobs_result_ttl_s
        self.max_queued = settings.jobs_max_queued
        self.retry_after_s = settings.retry_after_s

    def store_timeout(self, size: int) -> float:
        """Seconds for a statement that writes `size` bytes."""
        return self.command_timeout_s + size / STORE_BYTES_PER_S

    async def submit(
        self, model: str, version: str, body: bytes, json_length: int | None
    ) -> uuid.UUID:
        job_id = uuid.uuid4()
        try:
            async with self.db.connection(self.timeout_s) as conn:
                status = await conn.execute(
                    _INSERT, job_id, model, version, body, json_length, self.max_queued
                )
        except asyncpg.UndefinedTableError:
            raise schema_missing(self.retry_after_s) from None
        if status.endswith(" 0"):
            raise Overloaded(
                f"job queue full: {self.max_queued} jobs queued (PODSERVE_JOBS_MAX_QUEUED); "
                "retry later",
                retry_after_s=self.retry_after_s,
            )
        return job_id

    async def get(self, job_id: uuid.UUID) -> asyncpg.Record | None:
        try:
            async with self.db.connection(self.timeout_s) as conn:
                return await conn.fetchrow(_GET, job_id)
        except asyncpg.UndefinedTableError:
            raise schema_missing(self.retry_after_s) from None

    async def claim(self, owner: str, limit: int = 1) -> list[ClaimedJob]:
        async with self.db.background(self.timeout_s) as conn:
            rows = await conn.fetch(_CLAIM, limit, owner, self.lease_s)
        return [_claimed(row) for row in rows]

    async def succeed(
        self, job: ClaimedJob, owner: str, result: bytes, log_row: Row | None
    ) -> bool:
        """Store the result if we still hold the lease (and its log row, atomically).

        Each statement gets store_timeout(size) from PostgreSQL itself (statement_timeout),
        so a store that takes too long ends there, its row lock with it, and the job can be
        requeued at once; asyncpg's own timeout, a little later, is for a dead network.
        Either way it raises TimeoutError."""
        record = None if log_row is None else to_record(log_row)
        timeout_s = self.store_timeout(stored_bytes(result, record))
        try:
            return await self._write_result(job, owner, result, record, timeout_s)
        except asyncpg.QueryCanceledError as exc:  # statement_timeout (or an operator)
            raise TimeoutError(f"PostgreSQL cancelled the statement: {exc}") from exc

    async def _write_result(
        self,
        job: ClaimedJob,
        owner: str,
        result: bytes,
        record: tuple[Any, ...] | None,
        timeout_s: float,
    ) -> bool:
        async with self.db.background(self.timeout_s) as conn, conn.transaction():
            await conn.execute(self.db.bound_transaction_sql)
            await conn.execute(f"SET LOCAL statement_timeout = {round(timeout_s * 1000)}")
            client_timeout_s = timeout_s + STORE_CLIENT_SLACK_S
            status = await conn.execute(
                _SUCCEED, job.id, owner, job.attempts, result, self.ttl_s,
                timeout=client_timeout_s,
            )  # fmt: skip
            stored = status.endswith(" 1")
            if stored and record is not None:
                await conn.execute(INSERT_ONE, *record, timeout=client_timeout_s)
        return stored

    async def fail(self, job: ClaimedJob, owner: str, error: str, refund: bool = False) -> bool:
        """`refund`: the attempt was claimed only to give up (attempts stays the maximum)."""
        async with self.db.background(self.timeout_s) as conn:
            status = await conn.execute(
                _FAIL, job.id, owner, job.attempts, error, self.ttl_s, int(refund)
            )
        return status.endswith(" 1")

    async def requeue(
        self, job: ClaimedJob, owner: str, delay_s: float, refund: bool, error: str | None = None
    ) -> None:
        """`error`: why (kept for the job's final error); None keeps the one it has."""
        async with self.db.background(self.timeout_s) as conn:
            await conn.execute(_REQUEUE, job.id, owner, job.attempts, delay_s, int(refund), error)

    async def renew(
        self, leases: list[tuple[uuid.UUID, int]], owner: str
    ) -> list[tuple[uuid.UUID, int]]:
        """Extend the leases of these (job id, attempt)s, where they are still ours; returns
        those definitely lost (not merely skipped because the row is locked)."""
        ids = [job_id for job_id, _ in leases]
        attempts = [attempt for _, attempt in leases]
        async with self.db.background(self.timeout_s) as conn:
            renewed = await conn.fetch(_RENEW, ids, attempts, owner, self.lease_s)
            if len(renewed) == len(leases):
                return []
            done = {(row["id"], row["attempts"]) for row in renewed}
            rest = [lease for lease in leases if lease not in done]
            rows = await conn.fetch(
                _LOST, [job_id for job_id, _ in rest], [attempt for _, attempt in rest], owner
            )
        return [(row["id"], row["attempts"]) for row in rows]

    async def purge_expired(self) -> int:
        """One batch (at most PURGE_BATCH rows); returns how many were deleted."""
        async with self.db.background(self.timeout_s) as conn:
            status = await conn.execute(_PURGE)
        return int(status.rsplit(" ", 1)[-1])

    async def count_pending(self) -> dict[str, int]:
        """{'queued': n, 'running': m}: every job in the database, not only this pod's."""
        async with self.db.background(self.timeout_s) as conn:
            row = await conn.fetchrow(_COUNT)
        assert row is not None  # an aggregate always has a row
        return {"queued": row["queued"], "running": row["running"]}


def _background_error(exc: BaseException) -> str:
    """A background query's failure, for its log line: what to do, where that is known."""
    if isinstance(exc, asyncpg.UndefinedTableError):
        return SCHEMA_MISSING
    return repr(exc)


class _Failing:
    """A background loop's failures in the log: a warning with the first one's reason, nothing
    more while they go on (an outage's errors vary), and a line once the loop works again.
    An unmigrated database failed the purge with a warning every minute, for ever."""

    def __init__(self, what: str) -> None:
        self.what = what  # "claim jobs": "cannot claim jobs"
        self.reason: str | None = None  # the first of the failures going on; None: none

    def failed(self, exc: BaseException) -> None:
        if self.reason is None:
            self.reason = _background_error(exc)
            log.warning(f"cannot {self.what}", extra={"error": self.reason})

    def succeeded(self) -> None:
        if self.reason is not None:
            log.info(f"can {self.what} again", extra={"error_was": self.reason})
        self.reason = None


def _claimed(row: asyncpg.Record) -> ClaimedJob:
    return ClaimedJob(
        row["id"], row["model"], row["model_version"], row["body"], row["json_length"],
        row["attempts"], row["error"],
    )  # fmt: skip


def stored_bytes(result: bytes, record: Sequence[Any] | None) -> int:
    """What storing a job's result writes: the result, and its log row's text, if any."""
    return len(result) + (0 if record is None else _text_bytes(record))


def _text_bytes(record: Sequence[Any]) -> int:
    """About the size of a log row on the wire: its JSON columns (outputs, maybe inputs)."""
    return sum(len(value) for value in record if isinstance(value, str))


def _tensor_bytes(tensors: Tensors) -> int:
    return sum(array.nbytes for array in tensors.values())


def _job_attributes(job: ClaimedJob) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "podserve.job.id": str(job.id),
        "podserve.job.attempt": job.attempts,
        "podserve.model": job.model,
    }
    if job.version is not None:
        attributes["podserve.model.version"] = job.version
    return attributes


def _note_outcome(outcome: str, error: str | None = None) -> None:
    """On the attempt's job.run span (none untraced: a no-op): how it ended, and why not well."""
    span = trace.get_current_span()
    span.set_attribute("podserve.job.outcome", outcome)
    if error is not None:
        span.set_status(StatusCode.ERROR, error)


def _store_error_cause(exc: BaseException) -> BaseException:
    """The error that made storing fail. A statement timeout shows up as the InterfaceError of
    the rollback that follows it ("connection is closed"), with the TimeoutError as context."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


class JobRunner:
    """Per worker: claims up to PODSERVE_JOBS_CONCURRENCY jobs at a time and runs them."""

    def __init__(
        self,
        store: JobStore,
        runtime: ServingRuntime,
        features: FeatureStore | None,
        settings: Settings,
        log_inputs: str | None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.features = features
        self.settings = settings
        self.log_inputs = log_inputs  # None: the prediction log is off
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.poll_s = settings.jobs_poll_ms / 1000
        self.max_attempts = settings.jobs_max_attempts
        self.max_result_bytes = settings.jobs_max_result_bytes
        # By (job id, attempt): a job that lost its lease and was claimed again by this
        # worker runs twice here for a while, and each attempt must keep (and finally drop)
        # its own entry, or the live attempt's lease goes unrenewed.
        self.running: dict[tuple[uuid.UUID, int], Execution] = {}
        self.slots = asyncio.Semaphore(settings.jobs_concurrency)
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.executions: set[asyncio.Task[None]] = set()
        # Running totals; metrics.Metrics turns them into counters once a second.
        self.jobs_succeeded = 0
        self.log_rows_written = 0  # prediction-log rows, which metrics add to the online ones
        self.jobs_failed = 0
        self.jobs_requeued = 0
        self.results_discarded = 0  # finished after losing the lease: someone else owns it
        self.claim_errors = 0
        # The database's queued and running jobs, last counted (None: not yet), and a serial
        # that tells the metrics a new count came in.
        self.pending_counts: dict[str, int] | None = None
        self.pending_serial = 0

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._claim_forever(), name="jobs-claim"),
            asyncio.create_task(self._renew_forever(), name="jobs-lease"),
            asyncio.create_task(self._purge_forever(), name="jobs-purge"),
        ]
        # One worker per pod counts (slot 0, which a replacement takes over): the count is of
        # the whole database, and every worker of every pod ran it.
        if self.settings.jobs_count_interval_s > 0 and connection_balance.own_slot() in (None, 0):
            count = self._count_forever(self.settings.jobs_count_interval_s)
            self.tasks.append(asyncio.create_task(count, name="jobs-count"))

    async def stop(self, grace_s: float = 0.5) -> None:
        """Stop claiming; let running jobs finish briefly, hand the rest back to the queue
        (another worker takes them at once instead of after the lease).

        The session runs still going after `grace_s` are terminated before the hand-back: a
        long job would otherwise keep its inference thread computing a result no one will
        store, holding up the worker's shutdown (the pool joins its threads) until
        Gunicorn's SIGKILL, while another worker already runs the job again."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.executions:
            await asyncio.wait(self.executions, timeout=grace_s)
        running = list(self.running.values())
        for execution in running:
            execution.run_options.terminate = True
        requeues = [
            self.store.requeue(execution.job, self.owner, 0.0, refund=True) for execution in running
        ]
        if requeues:  # bounded: with the database gone, the leases expire instead
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.gather(*requeues, return_exceptions=True)
        for task in self.executions:
            task.cancel()

    # --- claiming ----------------------------------------------------------------------
    async def _claim_forever(self) -> None:
        failures = 0
        failing = _Failing("claim jobs")
        while True:
            await self.slots.acquire()
            try:
                jobs = await self.store.claim(self.owner)
                failures = 0
                failing.succeeded()
            except Exception as exc:
                self.slots.release()
                failures += 1
                self.claim_errors += 1
                failing.failed(exc)
                await self._idle(min(5.0, self.poll_s * 2**failures))
                continue
            if not jobs:
                self.slots.release()
                await self._idle(self.poll_s * random.uniform(0.5, 1.5))
                continue
            for job in jobs:
                task = asyncio.create_task(self._execute(job), name=f"job-{job.id}")
                self.executions.add(task)
                task.add_done_callback(self.executions.discard)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)
        self.wake.clear()

    # --- running -----------------------------------------------------------------------
    async def _execute(self, job: ClaimedJob) -> None:
        execution = Execution(job)
        self.running[execution.key] = execution
        try:
            # One trace per attempt: its phases and queries under it, not lone query spans.
            with background_span("job.run", _job_attributes(job)):
                await self._run(execution)
        except Exception as exc:  # the database went away while finishing: the lease expires
            log.warning("job not finished", extra={"job": str(job.id), "error": repr(exc)})
        finally:
            if self.running.get(execution.key) is execution:  # only our own entry
                del self.running[execution.key]
            self.slots.release()

    async def _run(self, execution: Execution) -> None:
        job = execution.job
        if job.attempts > self.max_attempts:
            last = f"; last error: {job.last_error}" if job.last_error else ""
            await self._fail(job, f"gave up after {self.max_attempts} attempts{last}", True)
            return
        execution.computing = True
        try:
            result, log_row = await self._infer(job, execution.run_options)
        except Exception as exc:
            failure: Exception | None = exc
        else:
            failure = None
        finally:
            execution.computing = False
        if execution.lease_lost:  # the renewer found it another's (terminated, or done before
            self.results_discarded += 1  # the terminate took): nothing to fail, requeue, store
            _note_outcome("discarded")
            return
        if failure is not None:
            if execution.run_options.terminate:  # stop() hands the job back: not its failure
                log.info("job handed back", extra={"job": str(job.id)})
                _note_outcome("handed_back")
            else:
                await self._inference_failed(job, failure)
            return
        await self._store(job, result, log_row)

    async def _inference_failed(self, job: ClaimedJob, exc: Exception) -> None:
        if isinstance(exc, PodserveError):
            if exc.status_code >= 500:
                await self._retry_or_fail(job, exc.message)
            else:
                await self._fail(job, exc.message)
            return
        log.error("job inference failed", exc_info=exc, extra={"job": str(job.id)})
        await self._fail(job, f"inference failed: {type(exc).__name__}: {exc}")

    async def _store(self, job: ClaimedJob, result: bytes, log_row: Row | None) -> None:
        try:
            stored = await self.store.succeed(job, self.owner, result, log_row)
        except Exception as exc:
            cause = _store_error_cause(exc)
            record = None if log_row is None else to_record(log_row)
            size = stored_bytes(result, record)  # as succeed() sized its timeout
            reason = f"result could not be stored: {self._describe(cause, size)}"
            extra = {"job": str(job.id), "error": reason}
            if isinstance(cause, TRANSIENT_STORE_ERRORS):
                log.warning("job result not stored; trying again later", extra=extra)
                await self._retry_or_fail(job, reason)  # raises if the database is gone
            else:  # it would fail the same way every time
                log.error("job result not stored", extra=extra)
                await self._fail(job, reason)
            return
        if stored:
            self.jobs_succeeded += 1
            self.log_rows_written += log_row is not None  # in the result's transaction
            _note_outcome("succeeded")
        else:
            self.results_discarded += 1
            _note_outcome("discarded")
            log.warning("job result discarded: lease lost", extra={"job": str(job.id)})

    def _describe(self, cause: BaseException, size: int) -> str:
        what = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        if isinstance(cause, TimeoutError | asyncpg.QueryCanceledError):
            return (
                f"{what} (allowed {self.store.store_timeout(size):.1f} s for {size} bytes: "
                "PODSERVE_DB_COMMAND_TIMEOUT_S plus 1 s per 4 MiB)"
            )
        return what

    async def _retry_or_fail(self, job: ClaimedJob, reason: str) -> None:
        """A server-side condition: again later with backoff, while attempts are left."""
        if job.attempts < self.max_attempts:
            delay = min(60.0, 2.0**job.attempts)
            await self.store.requeue(job, self.owner, delay, refund=False, error=reason)
            self.jobs_requeued += 1
            _note_outcome("requeued", reason)
        else:
            await self._fail(job, reason)

    async def _fail(self, job: ClaimedJob, message: str, refund: bool = False) -> None:
        _note_outcome("failed", message)
        if await self.store.fail(job, self.owner, message, refund):
            self.jobs_failed += 1

    async def _infer(
        self, job: ClaimedJob, run_options: ort.RunOptions
    ) -> tuple[bytes, Row | None]:
        runtime = self.runtime
        model = runtime.model(job.model, job.version)
        # A stored body is up to PODSERVE_MAX_BODY_BYTES: parsed in a thread when large,
        # as the request path does, so the worker's requests are not held up meanwhile.
        parsed = await parse_body(parse_infer_request, job.body, job.json_length)
        lookup = entity_lookup(parsed.parameters, has_inputs=bool(parsed.inputs))
        timings: dict[str, float] = {}
        inputs = parsed.inputs
        if lookup is not None:
            if self.features is None:
                raise ServiceUnavailable("feature lookup is not available")
            started = time.perf_counter()
            with phase_span("features"):
                inputs = await self.features.tensor(model, lookup)
            timings["features"] = time.perf_counter() - started
        inputs, rows = model.validate(inputs, parsed.datatypes)
        trace.get_current_span().set_attribute("podserve.rows", rows)
        started = time.perf_counter()
        with phase_span("infer"):
            outputs = await self._run_in_pieces(model, inputs, rows, run_options)
        timings["infer"] = time.perf_counter() - started
        args = (model, parsed, inputs, outputs, timings, str(job.id))
        small = _tensor_bytes(outputs) <= ENCODE_ON_LOOP_MAX_BYTES
        if small and not classification_is_large(parsed, outputs):
            return self._encode(*args)
        return await asyncio.to_thread(self._encode, *args)

    async def _run_in_pieces(
        self, model: OnnxModel, inputs: Tensors, rows: int, run_options: ort.RunOptions
    ) -> Tensors:
        """The job's outputs, from session runs of at most piece_rows(model) rows, each
        awaiting the pool at BACKGROUND priority: an online batch that arrives meanwhile
        gets the thread after the current piece, not after the whole job (one run of 1,024
        rows of a slow model held it for 6.5 s). The pieces' outputs, concatenated in
        order, are what one run makes."""
        size = piece_rows(model)
        if size is None or rows <= size:
            return await self._run_piece(model, inputs, rows, run_options)
        pieces: list[Tensors] = []
        counts: list[int] = []
        for start in range(0, rows, size):
            if run_options.terminate:  # lease lost or shutting down: not even a next piece
                raise RuntimeError("job run terminated between two pieces")
            piece = slice_rows(inputs, start, start + size)
            counts.append(min(size, rows - start))
            pieces.append(await self._run_piece(model, piece, counts[-1], run_options))
        joined = join_pieces(pieces, counts)
        if joined is None:  # rare: the warm-up found a row per input row for 2 and 3 rows
            log.warning(
                "job outputs have no row per input row: run again as one piece",
                extra={"model": model.name, "version": model.version},
            )
            del pieces
            return await self._run_piece(model, inputs, rows, run_options)
        return joined

    async def _run_piece(
        self, model: OnnxModel, inputs: Tensors, rows: int, run_options: ort.RunOptions
    ) -> Tensors:
        """One session run; `run_options` lets the runner terminate it (lease lost, stop)."""
        batch = await self.runtime.pool.run(
            model.run_batch, [inputs], [rows], run_options, priority=BACKGROUND
        )
        return batch.outputs[0]

    def _encode(
        self, model: OnnxModel, parsed: InferRequest, inputs: Tensors, outputs: Tensors,
        timings: dict[str, float], job_id: str,
    ) -> tuple[bytes, Row | None]:  # fmt: skip
        """The stored result (JSON) and its prediction-log row; in a thread when large."""
        for wanted in parsed.outputs or []:
            wanted.binary = False  # a stored result is JSON
        parsed.binary_output = False
        content, _ = encode_infer_response(
            model.name, model.version, parsed, outputs, [s.name for s in model.outputs],
            labels=model.labels,
        )  # fmt: skip
        if len(content) > self.max_result_bytes:  # before the log row: it is as large
            raise PayloadTooLarge(
                f"result of {len(content)} bytes exceeds PODSERVE_JOBS_MAX_RESULT_BYTES "
                f"({self.max_result_bytes})"
            )
        if self.log_inputs is None:
            return content, None
        log_row = make_row(
            job_id, parsed.id, model.name, model.version, inputs, outputs, timings,
            current_trace_id(), self.log_inputs,
        )  # fmt: skip
        return content, log_row

    # --- leases, expiry, counts ----------------------------------------------------------
    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.store.lease_s / 3)
            if self.running:
                try:
                    lost = await self.store.renew(list(self.running), self.owner)
                except Exception as exc:  # we cannot tell whose the jobs are: stop nothing
                    log.warning("cannot renew job leases", extra={"error": repr(exc)})
                    continue
                for key in lost:
                    self._abandon(key)

    def _abandon(self, key: tuple[uuid.UUID, int]) -> None:
        """The job is no longer this attempt's (claimed again, here or elsewhere, finished or
        gone): end its session run instead of computing a result no one stores (only while
        it computes, and once)."""
        execution = self.running.get(key)
        if execution is None or not execution.computing or execution.lease_lost:
            return
        execution.lease_lost = True
        execution.run_options.terminate = True
        log.warning(
            "job lease lost: its session run terminated",
            extra={"job": str(key[0]), "attempt": key[1]},
        )

    async def _purge_forever(self) -> None:
        period = min(60.0, max(1.0, self.store.ttl_s / 2))
        failing = _Failing("purge expired jobs")
        while True:
            await asyncio.sleep(period * random.uniform(0.8, 1.2))
            try:
                purged = await self._purge_pass()
            except Exception as exc:
                failing.failed(exc)
                continue
            failing.succeeded()
            if purged:
                log.info("expired jobs purged", extra={"jobs": purged})

    async def _purge_pass(self) -> int:
        """Batches until one comes back short (nothing left) or PURGE_PASS_S is spent: one
        batch a pass fell behind any pod finishing more than ~1,000 jobs a minute."""
        deadline = time.monotonic() + PURGE_PASS_S
        total = 0
        while True:
            purged = await self.store.purge_expired()
            total += purged
            if purged < PURGE_BATCH or time.monotonic() >= deadline:
                return total

    async def _count_forever(self, interval_s: float) -> None:
        """Count the database's queued and running jobs for the metrics, every `interval_s`:
        one cheap query per worker and interval, never from a scrape (a scrape must not wait
        on, or fail with, the database)."""
        delay = random.uniform(0.0, min(1.0, interval_s))  # soon after start, workers apart
        while True:
            await asyncio.sleep(delay)
            delay = interval_s * random.uniform(0.9, 1.1)
            try:
                self.pending_counts = await self.store.count_pending()
            except Exception as exc:  # the gauge keeps the last count; claims log the outage
                log.debug("cannot count jobs", extra={"error": repr(exc)})
                continue
            self.pending_serial += 1
