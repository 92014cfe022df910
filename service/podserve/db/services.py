"""Everything PostgreSQL in one worker: pool, feature store, prediction log (and its
retention purger), job runner.

Without PODSERVE_DATABASE_URL all of them stay None: raw-tensor inference works as before
and the database features answer 501 (errors.NotConfigured) saying they are not
configured (a job's status: 404, as no job can exist).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import asyncpg

from podserve import connection_balance
from podserve.db.features import FeatureStore
from podserve.db.jobs import JobRunner, JobStore
from podserve.db.log_retention import LogRetention
from podserve.db.migrations import schema_status
from podserve.db.pool import CONNECTION_ERRORS, Database
from podserve.db.prediction_log import PredictionLog
from podserve.db.spool import Spool
from podserve.settings import Settings

if TYPE_CHECKING:
    from podserve.runtime import ServingRuntime

log = logging.getLogger(__name__)

# What an ordinary role may open in this database: the server's slots less those kept for
# superusers and, from PostgreSQL 16, for roles with pg_use_reserved_connections
# (reserved_connections: NULL before 16, where current_setting(name, true) finds no such
# setting), and the database's and the role's own CONNECTION LIMIT (-1: none). A role that
# may use the reserved slots is told the ordinary budget: the conservative side.
CONNECTION_LIMITS_SQL = """
SELECT current_setting('max_connections')::int
         - current_setting('superuser_reserved_connections')::int
         - COALESCE(current_setting('reserved_connections', true)::int, 0) AS server,
       (SELECT datconnlimit FROM pg_database WHERE datname = current_database()) AS db,
       (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user) AS role
"""


class DatabaseServices:
    def __init__(self, settings: Settings, runtime: ServingRuntime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.database: Database | None = None
        self.features: FeatureStore | None = None
        self.prediction_log: PredictionLog | None = None
        self.log_retention: LogRetention | None = None
        self.jobs: JobStore | None = None
        self.job_runner: JobRunner | None = None

    @property
    def configured(self) -> bool:
        return self.settings.database_url is not None

    async def start(self) -> None:
        """After the models are loaded (job inference needs them)."""
        if not self.configured:
            log.info("no PODSERVE_DATABASE_URL: features, prediction log and jobs are off")
            return
        settings = self.settings
        self.database = Database(settings)
        if await self.database.open():
            await self._check_schema()
        self.features = FeatureStore(self.database, settings)
        if settings.prediction_log:
            self.prediction_log = PredictionLog(self.database, Spool(settings.spool_dir), settings)
            await self.prediction_log.start()
        # Old rows are deleted whether or not this pod logs (rows of earlier runs, other
        # pods). One worker per pod (slot 0, which a replacement takes over); the purger's
        # advisory lock lets one purger of all pods delete at a time.
        if settings.prediction_log_retention_s > 0 and connection_balance.own_slot() in (None, 0):
            self.log_retention = LogRetention(self.database, settings)
            self.log_retention.start()
        if settings.jobs_enabled:
            self.jobs = JobStore(self.database, settings)
            if settings.jobs_concurrency > 0:  # 0: this pod accepts jobs, others run them
                log_inputs = settings.prediction_log_inputs if settings.prediction_log else None
                self.job_runner = JobRunner(
                    self.jobs, self.runtime, self.features, settings, log_inputs
                )
                self.job_runner.start()

    async def stop_background(self) -> None:
        """Lifespan shutdown, first thing (requests are done, so no more log rows come):
        running jobs go back to the queue, the prediction log goes to the database or the
        spool. Before the inference pool drains, which a long job inference could delay."""
        if self.log_retention is not None:
            await self.log_retention.stop()
        if self.job_runner is not None:
            await self.job_runner.stop()
        if self.prediction_log is not None:
            await self.prediction_log.close()

    async def close(self) -> None:
        if self.database is not None:
            await self.database.close()

    async def _check_schema(self) -> None:
        assert self.database is not None and self.database.pool is not None
        # The pool's own acquire, no slot: nothing else can want one yet (the feature store,
        # prediction log and jobs start after this), and the connection is back before they do.
        try:
            async with asyncio.timeout(self.settings.db_connect_timeout_s * 2):
                async with self.database.pool.acquire() as conn:
                    applied, latest = await schema_status(conn)
                    if connection_balance.own_slot() in (None, 0):  # one warning per pod
                        await self._check_connection_budget(conn)
        except (*CONNECTION_ERRORS, TimeoutError) as exc:
            log.warning("cannot check the database schema now", extra={"error": repr(exc)})
            return
        if applied < latest:
            log.warning(
                "database schema is behind: run `podserve db migrate`",
                extra={"schema_version": applied, "expected": latest},
            )

    async def _check_connection_budget(self, conn: asyncpg.Connection) -> None:
        """Warn when this pod's pools alone may open more connections than PostgreSQL lets
        this role have: past that, under load, connecting fails ("too many clients"), which
        answers 503 and counts toward the breaker, with the database healthy."""
        from podserve.runtime import resolve_workers  # runtime imports this module

        try:
            row = await conn.fetchrow(CONNECTION_LIMITS_SQL)
        except asyncpg.PostgresError as exc:  # a look, not a need: never fail the start on it
            log.info("cannot read PostgreSQL's connection limits", extra={"error": repr(exc)})
            return
        limits = {name: row[name] for name in ("server", "db", "role") if row[name] >= 0}
        workers = resolve_workers(self.settings)
        wanted = workers * self.settings.db_pool_max
        if wanted > min(limits.values()):
            log.warning(
                "PODSERVE_WORKERS x PODSERVE_DB_POOL_MAX exceeds what PostgreSQL accepts "
                "(other pods and clients not counted): lower either, or raise max_connections",
                extra={"workers": workers, "db_pool_max": self.settings.db_pool_max,
                       "connections": wanted, "postgres_limits": limits},
            )  # fmt: skip
