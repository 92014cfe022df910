"""PODSERVE_JOBS_MAX_QUEUED: a full job queue answers 503 + Retry-After (real server and DB)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx
import pytest

import postgres
from server_process import ServerProcess

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def _submit(client: httpx.Client) -> httpx.Response:
    return client.post("/v2/models/affine/jobs", json=BODY)


def _sql(db_url: str, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_full_job_queue_refuses_submissions_until_jobs_leave_it(
    db_url: str, db_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = postgres.server_env(
        db_url,
        tmp_path_factory.mktemp("spool"),
        PODSERVE_JOBS_MAX_QUEUED="3",
        PODSERVE_JOBS_CONCURRENCY="0",  # accept jobs, run none: they stay queued
        PODSERVE_RETRY_AFTER_S="7",
    )
    with (
        ServerProcess(db_models, workers=1, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        accepted = [_submit(client) for _ in range(3)]
        assert [r.status_code for r in accepted] == [202] * 3, [r.text for r in accepted]
        refused = _submit(client)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "7"
        assert "job queue full" in refused.json()["error"]
        assert "PODSERVE_JOBS_MAX_QUEUED" in refused.json()["error"]
        # Running and finished jobs do not count: only those waiting to run.
        first = accepted[0].json()["id"]
        _sql(db_url, f"UPDATE podserve_jobs SET status = 'running' WHERE id = '{first}'")
        assert _submit(client).status_code == 202
        assert _submit(client).status_code == 503
        # The refused submissions left nothing behind.
        statuses = [client.get(r.headers["location"]).json()["status"] for r in accepted]
        assert statuses == ["running", "queued", "queued"]


def test_no_cap_with_zero(
    db_url: str, db_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _sql(db_url, "DELETE FROM podserve_jobs")
    env = postgres.server_env(
        db_url,
        tmp_path_factory.mktemp("spool"),
        PODSERVE_JOBS_MAX_QUEUED="0",
        PODSERVE_JOBS_CONCURRENCY="0",
    )
    with (
        ServerProcess(db_models, workers=1, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        assert [_submit(client).status_code for _ in range(5)] == [202] * 5
