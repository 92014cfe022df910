"""Durable jobs: a lease lost while the worker lives ends the stale attempt's session run at
once (it used to compute to the end, then discard the result), and nothing short of a
definite loss does: not a row locked by the worker's own store, not a database outage.

The runner runs in this process against the module's PostgreSQL and a real ServingRuntime
(ONNX Runtime); another worker's claim is simulated by updating the job's row.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from job_harness import LEASE_S, job_body, job_harness

import postgres
from model_builders import affine_model, save, slow_model
from podserve.db.jobs import JobStore
from podserve.db.pool import Database
from podserve.settings import Settings
from tcp_proxy import TcpProxy

KNOBS = {"jobs_concurrency": 1, "jobs_max_attempts": 5}  # one job at a time: never its own
SLOW_ROWS = 256  # of "slower": ~18 s of ONNX Runtime on the 2-core dev machine
LOST_WARNING = "job lease lost: its session run terminated"
# What another worker's claim leaves: attempt + 1 under its own, fresh lease.
OTHER_CLAIM = """
UPDATE podserve_jobs SET lease_owner = 'other-worker', attempts = attempts + 1,
    lease_expires_at = now() + interval '60 s'
WHERE id = $1
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("lease-models")
    save(affine_model(2.0, 1.0), repo, "affine", 1)
    save(slow_model(layers=240), repo, "slower", 1)  # ~10-50 ms of CPU per row
    return repo


@pytest.fixture(autouse=True)
def _empty_queue(db_url: str) -> None:
    postgres.query(db_url, "TRUNCATE podserve_jobs")


async def _until(done: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_a_job_claimed_by_another_worker_ends_the_stale_session_run_at_once(
    db_url: str, proxy: TcpProxy, proxied_url: str, models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker is cut off from the database for longer than its lease while a long job
    computes, and another worker claims the job. Renewals fail meanwhile: that says nothing,
    so the run goes on. The first renewal after the outage finds the job claimed again and
    terminates the stale run (it used to compute on for the whole run, ~18 s, and only then
    discard its result): the job stays the other worker's, this attempt is neither failed nor
    requeued, it counts as discarded, and its slot is free for the next job."""

    async def scenario() -> dict[str, Any]:
        async with job_harness(proxied_url, models, db_url, **KNOBS) as h:
            job = await h.store.submit("slower", "1", job_body([[0.3] * 256] * SLOW_ROWS), None)
            h.runner.start()
            assert await _until(lambda: h.runtime.pool.busy == 1)
            await asyncio.sleep(0.3)  # inside the session run
            proxy.cut()
            try:
                await h.conn.execute(OTHER_CLAIM, job)
                await asyncio.sleep(2.5 * LEASE_S)  # ~7 failed renewals
                during_outage = (h.runtime.pool.busy, h.runner.results_discarded)
            finally:
                proxy.restore()
            restored = time.monotonic()
            await _until(lambda: h.runtime.pool.busy == 0, timeout=8)
            freed_s = time.monotonic() - restored
            await _until(lambda: not h.runner.running, timeout=2)
            stale = await h.row(job)
            counts = (h.runner.results_discarded, h.runner.jobs_failed, h.runner.jobs_requeued)
            after = await h.store.submit("affine", "1", job_body([[1, 2, 3, 4]]), None)
            return {
                "during_outage": during_outage,
                "freed_s": freed_s,
                "stale": stale,
                "counts": counts,
                "next": await h.finished(after),
            }

    with caplog.at_level(logging.WARNING, logger="podserve.db.jobs"):
        result = postgres.run(scenario())
    assert result["during_outage"] == (1, 0), result  # a failed renewal stops nothing
    assert result["freed_s"] < 5.0, result  # before: the rest of the run, ~15 s
    stale = result["stale"]
    assert (stale["status"], stale["lease_owner"], stale["attempts"]) == (
        "running", "other-worker", 2,
    ), result  # fmt: skip
    assert stale["result"] is None
    assert result["counts"] == (1, 0, 0), result  # discarded; neither failed nor requeued
    assert result["next"]["status"] == "succeeded", result  # the slot was released
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count(LOST_WARNING) == 1, messages
    assert "job result discarded: lease lost" not in messages


def test_a_row_locked_by_its_own_worker_is_not_taken_for_lost(
    db_url: str, models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While a job computes, its row is locked elsewhere (as this worker's own store of a
    result locks it) through several renewals: SKIP LOCKED skips it, but it is still ours, so
    its run goes on and the job succeeds as attempt 1."""

    async def scenario() -> dict[str, Any]:
        async with job_harness(db_url, models, **KNOBS) as h:
            gate = asyncio.Event()
            real_run = h.runtime.pool.run

            async def gated(fn: Any, *args: Any, priority: int) -> Any:
                await gate.wait()  # the session run, as far as the renewer can tell
                return await real_run(fn, *args, priority=priority)

            h.runtime.pool.run = gated  # type: ignore[method-assign]
            renewals: list[list[tuple[uuid.UUID, int]]] = []
            real_renew = h.store.renew

            async def counted(leases: list[tuple[uuid.UUID, int]], owner: str) -> Any:
                renewals.append(leases)
                return await real_renew(leases, owner)

            h.store.renew = counted  # type: ignore[method-assign]
            job = await h.store.submit("affine", "1", job_body([[1, 2, 3, 4]]), None)
            h.runner.start()
            assert await _until(lambda: bool(h.runner.running))
            locker = await asyncpg.connect(db_url)
            try:
                async with locker.transaction():
                    await locker.execute(
                        "SELECT 1 FROM podserve_jobs WHERE id = $1 FOR UPDATE", job
                    )
                    renewals.clear()
                    await asyncio.sleep(2 * LEASE_S)
                    renewed_while_locked = len(renewals)
                    terminated = [e.run_options.terminate for e in h.runner.running.values()]
            finally:
                await locker.close()
            gate.set()
            return {
                "renewals": renewed_while_locked,
                "terminated": terminated,
                "row": await h.finished(job),
                "discarded": h.runner.results_discarded,
            }

    with caplog.at_level(logging.WARNING, logger="podserve.db.jobs"):
        result = postgres.run(scenario())
    assert result["renewals"] >= 3, result
    assert result["terminated"] == [False], result
    row = result["row"]
    assert (row["status"], row["attempts"]) == ("succeeded", 1), result
    assert result["discarded"] == 0, result
    assert LOST_WARNING not in [record.getMessage() for record in caplog.records]


def test_a_renewal_reports_only_the_leases_definitely_lost(db_url: str) -> None:
    """Ours and free: renewed. Ours but locked (by our own store): skipped, not lost. Claimed
    by another owner, a later attempt of ours, finished, or gone: lost."""

    async def scenario() -> dict[str, Any]:
        settings = Settings(database_url=db_url, db_pool_min=0, jobs_lease_s=600)
        db = Database(settings)
        await db.open()
        store = JobStore(db, settings)
        conn = await asyncpg.connect(db_url)
        try:
            jobs = {}
            for name, status, owner, attempts in [
                ("free", "running", "me", 1),
                ("locked", "running", "me", 1),
                ("other", "running", "other-worker", 2),
                ("later", "running", "me", 2),
                ("finished", "succeeded", None, 1),
            ]:
                jobs[name] = await store.submit("affine", "1", b"{}", None)
                await conn.execute(
                    "UPDATE podserve_jobs SET status = $2, lease_owner = $3, attempts = $4, "
                    "lease_expires_at = now() + interval '1 s' WHERE id = $1",
                    jobs[name], status, owner, attempts,
                )  # fmt: skip
            jobs["gone"] = uuid.uuid4()
            leases = [(job_id, 1) for job_id in jobs.values()]
            lease = "SELECT lease_expires_at FROM podserve_jobs WHERE id = $1"
            before = {name: await conn.fetchval(lease, job_id) for name, job_id in jobs.items()}
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM podserve_jobs WHERE id = $1 FOR UPDATE", jobs["locked"]
                )
                lost = await asyncio.wait_for(store.renew(leases, "me"), 5)  # never waits
            after = {name: await conn.fetchval(lease, job_id) for name, job_id in jobs.items()}
            names = {job_id: name for name, job_id in jobs.items()}
            return {
                "lost": sorted(names[job_id] for job_id, _ in lost),
                "attempts": {attempt for _, attempt in lost},
                "extended": sorted(n for n in jobs if after[n] and after[n] > before[n]),
                "all_renewed": await store.renew([(jobs["free"], 1)], "me"),
            }
        finally:
            await conn.close()
            await db.close()

    result = postgres.run(scenario())
    assert result["lost"] == ["finished", "gone", "later", "other"], result
    assert result["attempts"] == {1}, result
    assert result["extended"] == ["free"], result
    assert result["all_renewed"] == [], result
