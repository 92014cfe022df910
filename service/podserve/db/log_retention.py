"""Prediction-log retention: delete rows older than PODSERVE_PREDICTION_LOG_RETENTION_S.

Off by default (0: rows are kept for ever, as before). When on, one worker per pod (slot 0,
as for the jobs count) runs a pass every `interval_s` (a tenth of the retention, 1 to 60 s):

- One purger at a time in the whole database: every transaction of a pass first takes
  `pg_try_advisory_xact_lock(LOCK_KEY)`; a worker that does not get it skips the rest of its
  pass (another one is purging). Transaction-scoped, so nothing is left on a pooled
  connection (see pool.keep_session) and it works through PgBouncer's transaction pooling.
- No new index: a table of hundreds of millions of rows cannot be indexed in a migration
  (a plain CREATE INDEX blocks writes; migrations run in a transaction, so not
  CONCURRENTLY). The existing `podserve_prediction_log_model_time (model, logged_at)` does
  it: a loose index scan (recursive CTE, one index descent per model) finds the models with
  rows older than the cutoff, then each model's old rows go oldest first in batches of
  `batch_rows` through a ctid subquery (an index range scan, then a TID scan).
- Short transactions: one batch each, a few thousand rows, within
  PODSERVE_DB_COMMAND_TIMEOUT_S; a batch that times out halves the batch size (rows with
  big content take longer to delete: their TOAST goes with them). Between two batches the
  purger rests as long as the batch took (at most half the time deleting: WAL shipping,
  replicas and autovacuum keep up), and a pass stops after PASS_S, so a backlog (retention
  just turned on) is deleted over several passes, not in one burst of WAL. Measured
  (local PostgreSQL 15): 1.4M old digest-sized rows of 2M deleted in one 6.3 s pass, rests
  included (~220k rows/s; 5,000-row batches of ~15 ms).

A failed pass (database down, slow) is logged and tried again next interval; it never
touches requests (its own connections from the pool's background path, its own task).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg

from podserve.db.pool import Database
from podserve.settings import Settings

log = logging.getLogger(__name__)

TABLE = "podserve_prediction_log"
# pg_try_advisory_xact_lock key: "podlogrp". The migration runner's is "podserve".
LOCK_KEY = 0x706F_646C_6F67_7270
BATCH_ROWS = 2000  # first batch size
BATCH_ROWS_MAX = 5000
BATCH_ROWS_MIN = 50
PASS_S = 10.0  # a pass deletes batches for at most this long
REST_MIN_S = 0.01  # the shortest rest between two batches
INTERVAL_MIN_S, INTERVAL_MAX_S = 1.0, 60.0

_TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1)"
_CUTOFF = "SELECT now() - make_interval(secs => $1)"
# Models that have rows older than $1: a loose index scan of (model, logged_at), one descent
# per distinct model (and one per model for the EXISTS), whatever the table's size.
_MODELS = f"""
WITH RECURSIVE models(model) AS (
    (SELECT model FROM {TABLE} ORDER BY model LIMIT 1)
    UNION ALL
    SELECT (SELECT p.model FROM {TABLE} AS p WHERE p.model > m.model ORDER BY p.model LIMIT 1)
    FROM models AS m WHERE m.model IS NOT NULL
)
SELECT model FROM models
WHERE model IS NOT NULL
  AND EXISTS (SELECT 1 FROM {TABLE} AS p WHERE p.model = models.model AND p.logged_at < $1)
"""
# One batch of one model's oldest rows. ORDER BY logged_at keeps the planner on the index
# (rows come in its order) even where most of the table is old; ctid = ANY is a TID scan.
_DELETE = f"""
DELETE FROM {TABLE} WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {TABLE} WHERE model = $1 AND logged_at < $2 ORDER BY logged_at LIMIT $3))
"""


def purge_interval_s(retention_s: float) -> float:
    """A tenth of the retention, 1 to 60 s: rows live at most ~10% past their retention."""
    return min(INTERVAL_MAX_S, max(INTERVAL_MIN_S, retention_s / 10))


class LogRetention:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.retention_s = settings.prediction_log_retention_s
        self.interval_s = purge_interval_s(self.retention_s)
        self.timeout_s = settings.db_command_timeout_s + settings.db_connect_timeout_s
        self.command_timeout_s = settings.db_command_timeout_s
        self._begin_sql = db.bound_transaction_sql
        self.batch_rows = BATCH_ROWS
        # Running totals; metrics.Metrics exports rows_purged as a counter.
        self.rows_purged = 0
        self.passes = 0
        self.passes_skipped = 0  # another purger held the lock
        self.errors = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._purge_forever(), name="prediction-log-retention")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({self._task}, timeout=1.0)  # a batch's cancel lands meanwhile
        self._task = None

    async def _purge_forever(self) -> None:
        # The first pass soon after start (a recycled worker does not wait a full interval),
        # workers and pods apart.
        delay = self.interval_s * random.uniform(0.5, 1.0)
        while True:
            await asyncio.sleep(delay)
            delay = self.interval_s * random.uniform(0.8, 1.2)
            started = time.monotonic()
            try:
                purged = await self.purge_pass()
            except Exception as exc:  # database down or slow: the next pass tries again
                self.errors += 1
                log.warning(
                    "cannot purge old prediction-log rows now; trying again later",
                    extra={"error": repr(exc), "retry_s": round(delay, 1)},
                )
                continue
            if purged:
                log.info(
                    "old prediction-log rows purged",
                    extra={
                        "rows": purged,
                        "retention_s": self.retention_s,
                        "seconds": round(time.monotonic() - started, 3),
                        "batch_rows": self.batch_rows,
                    },
                )

    async def purge_pass(self) -> int | None:
        """Delete rows older than the retention, batch by batch, for at most PASS_S.

        Returns the rows deleted, or None when another purger held the lock at the start.
        """
        deadline = time.monotonic() + PASS_S
        found = await self._find()
        if found is None:
            self.passes_skipped += 1
            return None
        self.passes += 1
        cutoff, models = found
        total = 0
        for model in models:
            while True:
                limit = self.batch_rows  # the batch may change it for the next one
                started = time.monotonic()
                deleted = await self._delete_batch(model, cutoff, limit)
                if deleted is None:  # another purger took over between two batches
                    return total
                total += deleted
                if time.monotonic() >= deadline:
                    return total
                if deleted < limit:
                    break  # this model is done
                await asyncio.sleep(max(REST_MIN_S, time.monotonic() - started))
        return total

    async def _find(self) -> tuple[datetime, list[str]] | None:
        """The cutoff (the database's clock, the same for every pod) and the models with
        rows older than it; None if another purger holds the lock."""
        async with self._locked() as conn:
            if conn is None:
                return None
            cutoff: datetime = await conn.fetchval(_CUTOFF, self.retention_s)
            models = [row["model"] for row in await conn.fetch(_MODELS, cutoff)]
        return cutoff, models

    async def _delete_batch(self, model: str, cutoff: datetime, limit: int) -> int | None:
        """One short transaction; None if the lock is taken."""
        started = time.monotonic()
        try:
            async with self._locked() as conn:
                if conn is None:
                    return None
                status = await conn.execute(_DELETE, model, cutoff, limit)
        except (TimeoutError, asyncpg.QueryCanceledError):
            # Too slow for the command timeout (big rows, a busy database): smaller batches
            # from now on, and this pass ends (the caller logs it).
            self.batch_rows = max(BATCH_ROWS_MIN, limit // 2)
            raise
        deleted = int(status.rsplit(" ", 1)[-1])
        self.rows_purged += deleted
        if deleted == limit and time.monotonic() - started < self.command_timeout_s / 4:
            self.batch_rows = min(BATCH_ROWS_MAX, limit * 2)  # fast: back up towards the max
        return deleted

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[asyncpg.Connection | None]:
        """One short transaction holding the purge lock, or None if another purger has it."""
        async with (
            asyncio.timeout(self.timeout_s),
            self.db.background(self.timeout_s) as conn,
            conn.transaction(),
        ):
            await conn.execute(self._begin_sql)  # SET LOCAL idle_in_transaction_session_timeout
            yield conn if await conn.fetchval(_TRY_LOCK, LOCK_KEY) else None
