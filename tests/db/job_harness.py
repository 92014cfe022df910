"""A JobRunner in the test's own process, against the module's PostgreSQL and a real
ServingRuntime (ONNX Runtime): tests can hold an attempt at a chosen point and read its row."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from podserve.db.jobs import JobRunner, JobStore
from podserve.db.pool import Database
from podserve.runtime import ServingRuntime
from podserve.settings import Settings

LEASE_S = 1.0  # renewed every third


def job_body(rows: list[list[float]]) -> bytes:
    inputs = [{"name": "x", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": rows}]
    return orjson.dumps({"inputs": inputs})


def job_settings(db_url: str | None, models: Path, **knobs: Any) -> Settings:
    base: dict[str, Any] = {
        "model_repository": models,
        "database_url": db_url,
        "db_pool_min": 0,
        "db_command_timeout_s": 1.0,
        "db_connect_timeout_s": 1.0,
        "jobs_poll_ms": 50,
        "jobs_lease_s": LEASE_S,
        "jobs_max_attempts": 2,
        "jobs_count_interval_s": 0,
        "prediction_log": False,
    }
    return Settings(**(base | knobs))


@dataclass
class Harness:
    runtime: ServingRuntime
    store: JobStore
    runner: JobRunner
    conn: asyncpg.Connection  # straight to PostgreSQL (never through a test's proxy)

    async def row(self, job_id: uuid.UUID) -> asyncpg.Record:
        sql = "SELECT status, lease_owner, attempts, error, result FROM podserve_jobs WHERE id = $1"
        return await self.conn.fetchrow(sql, job_id)

    async def wait(
        self, job_id: uuid.UUID, done: Callable[[asyncpg.Record], bool], timeout: float = 20
    ) -> asyncpg.Record:
        deadline = time.monotonic() + timeout
        while True:
            row = await self.row(job_id)
            if done(row) or time.monotonic() > deadline:
                return row
            await asyncio.sleep(0.02)

    async def finished(self, job_id: uuid.UUID, timeout: float = 20) -> asyncpg.Record:
        return await self.wait(job_id, lambda r: r["status"] in ("succeeded", "failed"), timeout)


@asynccontextmanager
async def job_harness(
    runner_url: str, models: Path, direct_url: str | None = None, **knobs: Any
) -> AsyncIterator[Harness]:
    """A started runtime (no database of its own) and a runner on `runner_url`, not yet
    started; the harness's own connection goes to `direct_url` (default: the same)."""
    runtime = ServingRuntime(job_settings(None, models))
    await runtime.start()
    settings = job_settings(runner_url, models, **knobs)
    db = Database(settings)
    await db.open()
    store = JobStore(db, settings)
    runner = JobRunner(store, runtime, None, settings, None)
    conn = await asyncpg.connect(direct_url or runner_url)
    try:
        yield Harness(runtime, store, runner, conn)
    finally:
        await runner.stop()
        await runtime.stop()
        await db.close()
        await conn.close()
