"""podserve_db_pool_wait_seconds: how long requests waited for a pooled PostgreSQL connection.

A slow `features` phase is either a slow database or an exhausted pool; the histogram tells
them apart. Real server (one worker, PODSERVE_DB_POOL_MAX=1) and real PostgreSQL: with the
one connection held by a request whose query waits on a lock, the next request's wait shows
in the histogram's count and sum; with the pool free, every wait is small. A request for
the same entity waits on the first one's query instead (a shared lookup): that wait is in
podserve_feature_shared_wait_seconds, not in the pool's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import postgres
from metrics_support import Scrape, scrape, wait_for_in_flight
from podserve.db.pool import Database
from podserve.errors import ServiceUnavailable
from podserve.metrics import DB_POOL_WAIT_BUCKETS, ObservationTally
from podserve.settings import Settings
from server_process import ServerProcess

WAIT = "podserve_db_pool_wait_seconds"
SHARED_WAIT = "podserve_feature_shared_wait_seconds"
HOLD_S = 0.8  # how long the test keeps the pool's one connection busy
SMALL_S = "0.1"  # a bucket bound every wait for a free connection stays under
ENTITIES = 40


@pytest.fixture(scope="module")
def loaded(db_url: str) -> str:
    return postgres.load_features(db_url, "affine", ENTITIES)


@pytest.fixture(scope="module")
def server(
    loaded: str, db_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = postgres.server_env(
        loaded,
        tmp_path_factory.mktemp("spool"),
        PODSERVE_DB_POOL_MIN="1",
        PODSERVE_DB_POOL_MAX="1",
        # Long enough that the held connection answers 200s, not timeouts.
        PODSERVE_FEATURES_TIMEOUT_S="10",
        PODSERVE_DB_COMMAND_TIMEOUT_S="10",
        # Nothing but the requests under test takes the one connection.
        PODSERVE_PREDICTION_LOG="false",
        PODSERVE_PREDICTION_LOG_RETENTION_S="0",
        PODSERVE_JOBS_ENABLED="false",
    )
    with ServerProcess(db_models, workers=1, env=env) as proc:
        yield proc


def _lookup(url: str, entity: str) -> int:
    body = {"parameters": {"entity_ids": [entity]}}
    return httpx.post(f"{url}/v2/models/affine/infer", json=body, timeout=30).status_code


def _waits(url: str, at_least: float, name: str = WAIT) -> Scrape:
    """A scrape once the histogram `name` counts `at_least` waits (the worker adds them once a
    second at most, and at every scrape it answers)."""
    deadline = time.monotonic() + 10
    while (result := scrape(url)).value(f"{name}_count") < at_least:
        assert time.monotonic() < deadline, f"{name}_count stayed below {at_least}"
        time.sleep(0.1)
    return result


def _delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def _wait_for_gauge(url: str, name: str, value: float, timeout: float = 10.0) -> None:
    """Gauges are written once a second: until the worker's has `value`."""
    deadline = time.monotonic() + timeout
    while (seen := scrape(url).value(name)) != value:
        assert time.monotonic() < deadline, f"{name} is {seen}, not {value}"
        time.sleep(0.05)


def test_waits_for_a_free_pool_are_counted_and_small(server: ServerProcess) -> None:
    before = scrape(server.url)
    lookups = 20
    for i in range(lookups):  # one at a time: the connection is always free
        assert _lookup(server.url, f"e{i}") == 200
    after = _waits(server.url, before.value(f"{WAIT}_count") + lookups)
    assert _delta(after, before, f"{WAIT}_count") == lookups  # one acquisition per lookup
    assert _delta(after, before, f"{WAIT}_bucket", le=SMALL_S) == lookups
    assert _delta(after, before, f"{WAIT}_sum") < lookups * float(SMALL_S)


def test_a_held_connection_shows_as_the_next_requests_wait(
    server: ServerProcess, loaded: str
) -> None:
    """Request A takes the pool's only connection and its query waits on a table lock; B waits
    for the connection until A is answered. Before: no metric said B waited at all."""
    before = scrape(server.url)
    statuses: dict[str, int] = {}

    def send(entity: str) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: statuses.__setitem__(entity, _lookup(server.url, entity))
        )
        thread.start()
        return thread

    threads: list[threading.Thread] = []
    try:
        with postgres.table_locked(loaded, "podserve_features"):
            threads.append(send("e30"))  # A: holds the connection, its query behind the lock
            wait_for_in_flight(server.url, 1)
            _wait_for_gauge(server.url, "podserve_db_pool_in_use", 1)
            threads.append(send("e31"))  # B: another entity, so it waits for the connection
            _wait_for_gauge(server.url, "podserve_db_pool_waiting", 1)
            time.sleep(HOLD_S)  # B waits all along
    finally:
        for thread in threads:
            thread.join(30)
    assert statuses == {"e30": 200, "e31": 200}, statuses

    after = _waits(server.url, before.value(f"{WAIT}_count") + 2)
    assert _delta(after, before, f"{WAIT}_count") == 2
    assert _delta(after, before, f"{WAIT}_sum") >= HOLD_S  # B's wait, at least
    # A's wait was short, B's past every bucket up to HOLD_S.
    assert _delta(after, before, f"{WAIT}_bucket", le=SMALL_S) == 1
    assert _delta(after, before, f"{WAIT}_bucket", le="0.5") == 1
    assert _delta(after, before, f"{WAIT}_bucket", le="+Inf") == 2


def test_a_wait_on_another_requests_lookup_is_a_shared_wait(
    server: ServerProcess, loaded: str
) -> None:
    """A's query for e32 holds the pool's only connection behind a table lock; B asks for e32
    too, so it waits on A's query, not for a connection. Before: B's wait showed nowhere, and
    a slow `features` phase looked the same whether the pool was exhausted or not."""
    before = scrape(server.url)
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(_lookup(server.url, "e32")))
        for _ in range(2)
    ]
    try:
        with postgres.table_locked(loaded, "podserve_features"):
            threads[0].start()  # A: the query, behind the lock
            wait_for_in_flight(server.url, 1)
            _wait_for_gauge(server.url, "podserve_db_pool_in_use", 1)
            threads[1].start()  # B: the same entity
            wait_for_in_flight(server.url, 2)
            time.sleep(HOLD_S)  # B waits on A's query all along
    finally:
        for thread in threads:
            thread.join(30)
    assert statuses == [200, 200], statuses

    after = _waits(server.url, before.value(f"{SHARED_WAIT}_count") + 1, SHARED_WAIT)
    assert _delta(after, before, f"{SHARED_WAIT}_count") == 1  # B's
    # Most of HOLD_S (B's wait began some time after it was in flight): past small buckets.
    assert _delta(after, before, f"{SHARED_WAIT}_sum") >= HOLD_S / 2
    assert _delta(after, before, f"{SHARED_WAIT}_bucket", le="0.25") == 0
    after = _waits(server.url, before.value(f"{WAIT}_count") + 1)
    assert _delta(after, before, f"{WAIT}_count") == 1  # A's only: B took no connection
    assert _delta(after, before, f"{WAIT}_bucket", le=SMALL_S) == 1


def test_the_database_tallies_every_request_acquisition(loaded: str) -> None:
    """In one process: a wait that ends in a 503 (pool busy) counts too; background work
    (the prediction log's, jobs') does not."""
    settings = Settings(database_url=loaded, db_pool_min=1, db_pool_max=1)

    async def scenario() -> tuple[list[int], float]:
        db = Database(settings)
        await db.open()
        try:
            async with db.connection(5.0):
                with pytest.raises(ServiceUnavailable, match="database busy"):
                    async with db.connection(0.2):
                        pass
            async with db.background(5.0):
                pass
            return list(db.pool_waits.counts), db.pool_waits.total
        finally:
            await db.close()

    counts, total = postgres.run(scenario())
    assert sum(counts) == 2, counts  # the first request's and the refused one's
    assert total >= 0.2
    slow = DB_POOL_WAIT_BUCKETS.index(0.25)  # the refused request waited its 0.2 s
    assert counts[slow] == 1, counts


def test_the_tally_keeps_histogram_buckets() -> None:
    """le semantics, as Histogram.observe: a value on a bound counts in that bound's bucket."""
    tally = ObservationTally((0.1, 1.0))
    for value in (0.0, 0.1, 0.5, 1.0, 7.0):
        tally.observe(value)
    assert tally.counts == [2, 2, 1]
    assert tally.total == pytest.approx(8.6)
