"""The feature lookup under concurrent load with a healthy PostgreSQL (real server).

- Requests that wait for a pool connection while every one is in use answer a clear 503
  ("database busy") and do not count toward the breaker: the database did nothing wrong,
  and the next request must not be failed fast.
- Concurrent misses for the same entities share one query (no stampede when the cache is
  cold or an entry expires), and a request that waits on another's query still keeps to
  its own deadline, and still gets its answer when that other request is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import postgres
from podserve.db.features import FeatureStore
from podserve.db.pool import Database
from podserve.errors import DeadlineExceeded, ServiceUnavailable
from podserve.settings import Settings

ENTITIES = 10


@pytest.fixture(scope="module")
def loaded(db_url: str) -> str:
    return postgres.load_features(db_url, "hot", ENTITIES)


async def _hold_every_connection(db: Database, seconds: float, held: asyncio.Event) -> None:
    """A request (or the log writer) keeps the pool's only connection busy, healthily."""
    async with db.connection(5.0) as conn:
        held.set()
        await conn.execute(f"SELECT pg_sleep({seconds})")


def test_pool_waits_answer_busy_and_spare_the_breaker(loaded: str) -> None:
    """Four lookups wait 0.3 s for the pool's one connection, held 0.5 s by a healthy query.
    Before: each wait counted as a database failure, the breaker opened, and the next lookup
    was failed fast although the connection was free."""
    settings = Settings(database_url=loaded, db_pool_min=1, db_pool_max=1,
                        features_timeout_s=0.3, db_breaker_failures=3,
                        db_breaker_reset_s=5.0, retry_after_s=2)  # fmt: skip

    async def scenario() -> tuple[list[BaseException | dict], dict | BaseException]:
        db = Database(settings)
        await db.open()
        store = FeatureStore(db, settings)
        try:
            held = asyncio.Event()
            holder = asyncio.create_task(_hold_every_connection(db, 0.5, held))
            await held.wait()
            waits = await asyncio.gather(
                *(store.vectors("hot", [f"e{i}"]) for i in range(4)), return_exceptions=True
            )
            await holder  # the connection is free again (waiting for it within 0.3 s as the
            # hold ended was timing: it failed on a loaded machine)
            try:  # an open breaker (reset 5 s) would fail this one fast, the pool idle
                after: dict | BaseException = await store.vectors("hot", ["e1"])
            except ServiceUnavailable as exc:
                after = exc
            return waits, after
        finally:
            await db.close()

    waits, after = postgres.run(scenario())
    assert isinstance(after, dict) and list(after) == ["e1"], after
    for outcome in waits:  # no connection in time: it was in use by a healthy query
        assert isinstance(outcome, ServiceUnavailable), outcome
        assert "busy" in str(outcome), outcome
        # The overload's Retry-After: a busy worker clears fast (not the breaker's 5 s).
        assert outcome.headers.get("Retry-After") == "2", outcome.headers


def test_concurrent_misses_share_one_query(loaded: str) -> None:
    settings = Settings(database_url=loaded, db_pool_min=1, db_pool_max=4,
                        features_cache_size=100)  # fmt: skip

    async def scenario() -> tuple[int, list[dict], int]:
        db = Database(settings)
        await db.open()
        store = FeatureStore(db, settings)
        try:
            burst = await asyncio.gather(*(store.vectors("hot", ["e1", "e2"]) for _ in range(30)))
            queries = store.queries
            await store.vectors("hot", ["e1", "e2"])  # cached now: no query
            return queries, burst, store.queries
        finally:
            await db.close()

    queries, burst, after = postgres.run(scenario())
    assert queries == 1, f"{queries} queries for 30 concurrent lookups of the same two ids"
    assert after == 1
    for found in burst:
        assert sorted(found) == ["e1", "e2"]
        assert found["e2"].tolist() == [2.0] * 4


@contextlib.asynccontextmanager
async def _behind_a_lock(url: str) -> AsyncIterator[tuple[Database, FeatureStore, Any]]:
    """A pool of 2 and its feature store, while another session holds the table: every
    lookup's query waits until the test commits the `locker`'s transaction."""
    settings = Settings(database_url=url, db_pool_min=1, db_pool_max=2, features_timeout_s=5.0)
    db = Database(settings)
    await db.open()
    locker = await asyncpg.connect(url)
    try:
        await locker.execute("BEGIN; LOCK TABLE podserve_features IN ACCESS EXCLUSIVE MODE")
        yield db, FeatureStore(db, settings), locker
    finally:
        await locker.close()
        await db.close()


def test_a_cancelled_shared_lookup_leaves_its_followers_an_answer(loaded: str) -> None:
    """The request whose query the others wait on goes away (client disconnect): they query
    for themselves instead of failing with it."""

    async def scenario() -> tuple[dict, int]:
        async with _behind_a_lock(loaded) as (_db, store, locker):
            leader = asyncio.create_task(store.vectors("hot", ["e3"]))
            await asyncio.sleep(0.1)  # its query waits on the lock
            follower = asyncio.create_task(store.vectors("hot", ["e3"]))
            await asyncio.sleep(0.1)
            leader.cancel()
            await asyncio.sleep(0.1)
            await locker.execute("COMMIT")
            return await asyncio.wait_for(follower, 5.0), store.queries

    found, queries = postgres.run(scenario())
    assert found["e3"].tolist() == [3.0] * 4
    assert queries == 2  # the cancelled one, then the follower's own


def test_followers_of_a_leader_that_gives_up_share_one_query_again(loaded: str) -> None:
    """A leader with a short deadline (its own X-Podserve-Timeout-Ms) gives up: its followers
    must not each query on their own (20 queries for one hot entity, a pool of 2: the
    stampede the sharing is for), but follow the first of them to lead."""

    async def scenario() -> tuple[BaseException | None, list, int]:
        async with _behind_a_lock(loaded) as (_db, store, locker):
            leader = asyncio.create_task(
                store.vectors("hot", ["e5"], deadline=time.perf_counter() + 0.2)
            )
            await asyncio.sleep(0.05)  # its query waits on the lock
            followers = [asyncio.create_task(store.vectors("hot", ["e5"])) for _ in range(20)]
            error: BaseException | None = None
            try:
                await leader
            except DeadlineExceeded as exc:
                error = exc
            await asyncio.sleep(0.2)  # the followers' own queries would all be sent by now
            await locker.execute("COMMIT")
            found = await asyncio.wait_for(asyncio.gather(*followers), 5.0)
            return error, found, store.queries

    error, found, queries = postgres.run(scenario())
    assert isinstance(error, DeadlineExceeded), error
    assert all(f["e5"].tolist() == [5.0] * 4 for f in found)
    assert queries == 2, queries  # the leader's, then one for all 20 followers


def test_a_follower_keeps_to_its_own_deadline(loaded: str) -> None:

    async def scenario() -> tuple[BaseException | None, float, dict]:
        async with _behind_a_lock(loaded) as (_db, store, locker):
            leader = asyncio.create_task(store.vectors("hot", ["e4"]))
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                await store.vectors("hot", ["e4"], deadline=started + 0.2)
            except DeadlineExceeded as exc:
                error = exc
            waited = time.perf_counter() - started
            await locker.execute("COMMIT")
            return error, waited, await asyncio.wait_for(leader, 5.0)

    error, waited, leader_found = postgres.run(scenario())
    assert error is not None and "request deadline" in str(error), error
    assert 0.15 <= waited < 1.0, waited  # its own 0.2 s, not the leader's 5 s
    assert leader_found["e4"].tolist() == [4.0] * 4  # the shared query went on for the leader


def test_a_followers_wait_is_tallied_as_shared_not_as_a_pool_wait(loaded: str) -> None:
    """Two followers wait on the leader's query (held by a table lock): one gives up at its own
    0.2 s deadline, one gets the answer. Both waits are in `shared_waits`
    (podserve_feature_shared_wait_seconds), the given-up one too; the pool's tally has the
    leader's one acquisition only. Before: neither follower's wait was observed anywhere."""

    async def scenario() -> tuple[BaseException | None, dict, list[int], float, int]:
        async with _behind_a_lock(loaded) as (db, store, locker):
            leader = asyncio.create_task(store.vectors("hot", ["e6"]))
            await asyncio.sleep(0.1)  # its query waits on the lock
            patient = asyncio.create_task(store.vectors("hot", ["e6"]))
            error: BaseException | None = None
            try:
                await store.vectors("hot", ["e6"], deadline=time.perf_counter() + 0.2)
            except DeadlineExceeded as exc:
                error = exc
            await locker.execute("COMMIT")
            found = await asyncio.wait_for(patient, 5.0)
            await asyncio.wait_for(leader, 5.0)
            waits = store.shared_waits
            return error, found, list(waits.counts), waits.total, sum(db.pool_waits.counts)

    error, found, counts, total, pool_waits = postgres.run(scenario())
    assert isinstance(error, DeadlineExceeded), error
    assert found["e6"].tolist() == [6.0] * 4
    assert sum(counts) == 2, counts  # the one that gave up, and the one that got its answer
    assert total >= 0.2 + 0.15, total  # both waited at least the impatient one's 0.2 s
    assert pool_waits == 1  # the leader's: a follower takes no connection
