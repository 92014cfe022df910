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
against the online admission budget (a backlog of jobs never turns clients away).
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from podserve.db.features import FeatureStore, entity_lookup
from podserve.db.pool import Database
from podserve.db.prediction_log import INSERT_ONE, make_row, to_record
from podserve.errors import PodserveError, ServiceUnavailable
from podserve.inference_pool import BACKGROUND
from podserve.protocol_v2 import encode_infer_response, parse_infer_request
from podserve.settings import Settings

if TYPE_CHECKING:
    from podserve.runtime import ServingRuntime

log = logging.getLogger(__name__)

_CLAIM = """
WITH next AS (
    SELECT id FROM podserve_jobs
    WHERE (status = 'queued' AND run_after <= now())
       OR (status = 'running' AND lease_expires_at < now())
    ORDER BY run_after, created_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE podserve_jobs AS j
SET status = 'running', attempts = j.attempts + 1, lease_owner = $2,
    lease_expires_at = now() + make_interval(secs => $3),
    started_at = coalesce(j.started_at, now())
FROM next WHERE j.id = next.id
RETURNING j.id, j.model, j.model_version, j.body, j.json_length, j.attempts
"""
_MINE = "id = $1 AND status = 'running' AND lease_owner = $2 AND attempts = $3"
_SUCCEED = f"""
UPDATE podserve_jobs SET status = 'succeeded', result = $4, finished_at = now(),
    expires_at = now() + make_interval(secs => $5), lease_owner = NULL, lease_expires_at = NULL
WHERE {_MINE}
"""
_FAIL = f"""
UPDATE podserve_jobs SET status = 'failed', error = $4, finished_at = now(),
    expires_at = now() + make_interval(secs => $5), lease_owner = NULL, lease_expires_at = NULL
WHERE {_MINE}
"""
_REQUEUE = f"""
UPDATE podserve_jobs SET status = 'queued', run_after = now() + make_interval(secs => $4),
    attempts = attempts - $5, lease_owner = NULL, lease_expires_at = NULL
WHERE {_MINE}
"""
_RENEW = """
UPDATE podserve_jobs SET lease_expires_at = now() + make_interval(secs => $3)
WHERE id = ANY($1::uuid[]) AND status = 'running' AND lease_owner = $2
"""
_PURGE = """
DELETE FROM podserve_jobs WHERE id IN (
    SELECT id FROM podserve_jobs WHERE expires_at < now() LIMIT 1000)
"""
_GET = """
SELECT id, model, model_version, status, attempts, result, error,
       created_at, started_at, finished_at, expires_at
FROM podserve_jobs WHERE id = $1 AND (expires_at IS NULL OR expires_at > now())
"""
_INSERT = """
INSERT INTO podserve_jobs (id, model, model_version, body, json_length) VALUES ($1, $2, $3, $4, $5)
"""


@dataclass
class ClaimedJob:
    id: uuid.UUID
    model: str
    version: str | None
    body: bytes
    json_length: int | None
    attempts: int


class JobStore:
    """The SQL of jobs; every method takes one connection from the pool."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.timeout_s = settings.db_command_timeout_s + settings.db_connect_timeout_s
        self.lease_s = settings.jobs_lease_s
        self.ttl_s = settings.jobs_result_ttl_s

    async def submit(
        self, model: str, version: str, body: bytes, json_length: int | None
    ) -> uuid.UUID:
        job_id = uuid.uuid4()
        async with self.db.connection(self.timeout_s) as conn:
            await conn.execute(_INSERT, job_id, model, version, body, json_length)
        return job_id

    async def get(self, job_id: uuid.UUID) -> asyncpg.Record | None:
        async with self.db.connection(self.timeout_s) as conn:
            return await conn.fetchrow(_GET, job_id)

    async def claim(self, owner: str, limit: int = 1) -> list[ClaimedJob]:
        async with self.db.background(self.timeout_s) as conn:
            rows = await conn.fetch(_CLAIM, limit, owner, self.lease_s)
        return [
            ClaimedJob(
                r["id"], r["model"], r["model_version"], r["body"], r["json_length"], r["attempts"]
            )
            for r in rows
        ]

    async def succeed(
        self, job: ClaimedJob, owner: str, result: bytes, log_row: list[Any] | None
    ) -> bool:
        """Store the result if we still hold the lease (and its log row, atomically)."""
        async with self.db.background(self.timeout_s) as conn, conn.transaction():
            await conn.execute(self.db.bound_transaction_sql)
            status = await conn.execute(_SUCCEED, job.id, owner, job.attempts, result, self.ttl_s)
            stored = status.endswith(" 1")
            if stored and log_row is not None:
                await conn.execute(INSERT_ONE, *to_record(log_row))
        return stored

    async def fail(self, job: ClaimedJob, owner: str, error: str) -> bool:
        async with self.db.background(self.timeout_s) as conn:
            status = await conn.execute(_FAIL, job.id, owner, job.attempts, error, self.ttl_s)
        return status.endswith(" 1")

    async def requeue(self, job: ClaimedJob, owner: str, delay_s: float, refund: bool) -> None:
        async with self.db.background(self.timeout_s) as conn:
            await conn.execute(_REQUEUE, job.id, owner, job.attempts, delay_s, int(refund))

    async def renew(self, ids: list[uuid.UUID], owner: str) -> None:
        async with self.db.background(self.timeout_s) as conn:
            await conn.execute(_RENEW, ids, owner, self.lease_s)

    async def purge_expired(self) -> int:
        async with self.db.background(self.timeout_s) as conn:
            status = await conn.execute(_PURGE)
        return int(status.rsplit(" ", 1)[-1])


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
        self.running: dict[uuid.UUID, ClaimedJob] = {}
        self.slots = asyncio.Semaphore(settings.jobs_concurrency)
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.executions: set[asyncio.Task[None]] = set()
        # Plain counters for metrics.
        self.jobs_succeeded = 0
        self.jobs_failed = 0
        self.jobs_requeued = 0
        self.results_discarded = 0  # finished after losing the lease: someone else owns it
        self.claim_errors = 0

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._claim_forever(), name="jobs-claim"),
            asyncio.create_task(self._renew_forever(), name="jobs-lease"),
            asyncio.create_task(self._purge_forever(), name="jobs-purge"),
        ]

    async def stop(self, grace_s: float = 0.5) -> None:
        """Stop claiming; let running jobs finish briefly, hand the rest back to the queue
        (another worker takes them at once instead of after the lease)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.executions:
            await asyncio.wait(self.executions, timeout=grace_s)
        requeues = [
            self.store.requeue(job, self.owner, 0.0, refund=True) for job in self.running.values()
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
        while True:
            await self.slots.acquire()
            try:
                jobs = await self.store.claim(self.owner)
                failures = 0
            except Exception as exc:
                self.slots.release()
                failures += 1
                self.claim_errors += 1
                if failures == 1:
                    log.warning("cannot claim jobs", extra={"error": repr(exc)})
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
        self.running[job.id] = job
        try:
            await self._run(job)
        except Exception as exc:  # the database went away while finishing: the lease expires
            log.warning("job not finished", extra={"job": str(job.id), "error": repr(exc)})
        finally:
            self.running.pop(job.id, None)
            self.slots.release()

    async def _run(self, job: ClaimedJob) -> None:
        if job.attempts > self.max_attempts:
            await self._fail(job, f"gave up after {self.max_attempts} attempts")
            return
        try:
            result, log_row = await self._infer(job)
        except PodserveError as exc:
            if exc.status_code >= 500 and job.attempts < self.max_attempts:
                delay = min(60.0, 2.0**job.attempts)
                await self.store.requeue(job, self.owner, delay, refund=False)
                self.jobs_requeued += 1
            else:
                await self._fail(job, exc.message)
            return
        except Exception as exc:
            log.exception("job inference failed", extra={"job": str(job.id)})
            await self._fail(job, f"inference failed: {type(exc).__name__}: {exc}")
            return
        if await self.store.succeed(job, self.owner, result, log_row):
            self.jobs_succeeded += 1
        else:
            self.results_discarded += 1
            log.warning("job result discarded: lease lost", extra={"job": str(job.id)})

    async def _fail(self, job: ClaimedJob, message: str) -> None:
        if await self.store.fail(job, self.owner, message):
            self.jobs_failed += 1

    async def _infer(self, job: ClaimedJob) -> tuple[bytes, list[Any] | None]:
        runtime = self.runtime
        model = runtime.model(job.model, job.version)
        parsed = parse_infer_request(job.body, job.json_length)
        lookup = entity_lookup(parsed.parameters, has_inputs=bool(parsed.inputs))
        timings: dict[str, float] = {}
        inputs = parsed.inputs
        if lookup is not None:
            if self.features is None:
                raise ServiceUnavailable("feature lookup is not available")
            started = time.perf_counter()
            inputs = await self.features.tensor(model, lookup)
            timings["features"] = time.perf_counter() - started
        inputs, rows = model.validate(inputs, parsed.datatypes)
        started = time.perf_counter()
        batch = await runtime.pool.run(model.run_batch, [inputs], [rows], priority=BACKGROUND)
        timings["infer"] = time.perf_counter() - started
        for wanted in parsed.outputs or []:
            wanted.binary = False  # a stored result is JSON
        parsed.binary_output = False
        content, _ = encode_infer_response(
            model.name, model.version, parsed, batch.outputs[0], [s.name for s in model.outputs],
            labels=model.labels,
        )  # fmt: skip
        log_row = None
        if self.log_inputs is not None:
            log_row = make_row(
                str(job.id),
                parsed.id,
                model.name,
                model.version,
                inputs,
                batch.outputs[0],
                timings,
                None,
                self.log_inputs,
            )
        return content, log_row

    # --- leases and expiry --------------------------------------------------------------
    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.store.lease_s / 3)
            if self.running:
                try:
                    await self.store.renew(list(self.running), self.owner)
                except Exception as exc:
                    log.warning("cannot renew job leases", extra={"error": repr(exc)})

    async def _purge_forever(self) -> None:
        period = min(60.0, max(1.0, self.store.ttl_s / 2))
        while True:
            await asyncio.sleep(period * random.uniform(0.8, 1.2))
            try:
                purged = await self.store.purge_expired()
            except Exception as exc:
                log.warning("cannot purge expired jobs", extra={"error": repr(exc)})
                continue
            if purged:
                log.info("expired jobs purged", extra={"jobs": purged})
