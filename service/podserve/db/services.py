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
        try:
            async with asyncio.timeout(self.settings.db_connect_timeout_s * 2):
                async with self.database.pool.acquire() as conn:
                    applied, latest = await schema_status(conn)
        except (*CONNECTION_ERRORS, TimeoutError) as exc:
            log.warning("cannot check the database schema now", extra={"error": repr(exc)})
            return
        if applied < latest:
            log.warning(
                "database schema is behind: run `podserve db migrate`",
                extra={"schema_version": applied, "expected": latest},
            )
