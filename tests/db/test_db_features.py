"""Feature lookup end to end: CSV/Parquet load, Gunicorn with 2 workers, PostgreSQL via a proxy."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import postgres
from podserve.db.features import FeatureStore, TtlCache
from podserve.db.pool import Database
from podserve.phases import parse_server_timing
from podserve.settings import Settings
from server_process import ServerProcess
from tcp_proxy import TcpProxy

PODSERVE = [sys.executable, "-m", "podserve.cli"]
FEATURES_TIMEOUT_S = 0.5
ENTITIES = 200


def _vector(i: int) -> list[float]:
    return [i, i + 0.5, -i, i / 4]


def _load(path: Path, feature_set: str, url: str, *extra: str) -> str:
    result = subprocess.run(
        [
            *PODSERVE,
            "features",
            "load",
            str(path),
            "--set",
            feature_set,
            "--database-url",
            url,
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def loaded(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    files = tmp_path_factory.mktemp("features")
    csv_path = files / "affine.csv"
    lines = ["entity_id,f0,f1,f2,f3"] + [
        ",".join([f"e{i}", *map(str, _vector(i))]) for i in range(ENTITIES)
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    assert f"loaded {ENTITIES} rows" in _load(csv_path, "affine", db_url)
    # Parquet, integer ids, a different set: the entity's vector is 10x.
    table = pa.table(
        {
            "user": list(range(50)),
            **{f"f{j}": [10 * _vector(i)[j] for i in range(50)] for j in range(4)},
        }
    )
    pq.write_table(table, files / "alt.parquet")
    assert "loaded 50 rows" in _load(files / "alt.parquet", "alt", db_url, "--id-column", "user")
    wide = files / "wide.csv"
    wide.write_text("entity_id,a,b,c,d,e\nw1,1,2,3,4,5\n")
    _load(wide, "wide", db_url)
    return db_url


def test_the_load_says_how_many_entities_repeated_ids_left(loaded: str, tmp_path: Path) -> None:
    """Three rows of one id store one entity (the last row): "loaded 3 rows" alone misled."""
    repeats = tmp_path / "repeats.csv"
    repeats.write_text("entity_id,f0,f1,f2,f3\nr1,1,1,1,1\nr1,2,2,2,2\nr1,3,3,3,3\nr2,4,4,4,4\n")
    out = _load(repeats, "repeats", loaded)
    assert "loaded 4 rows" in out and ": 2 entities (2 rows repeated an id" in out, out
    unique = tmp_path / "unique.csv"
    unique.write_text("entity_id,f0,f1,f2,f3\nu1,1,1,1,1\nu2,2,2,2,2\n")
    out = _load(unique, "unique", loaded)
    assert "loaded 2 rows" in out and "entities" not in out, out


@pytest.fixture(scope="module")
def server(
    loaded: str, proxied_url: str, db_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = postgres.server_env(
        proxied_url,
        tmp_path_factory.mktemp("spool"),
        PODSERVE_FEATURES_TIMEOUT_S=str(FEATURES_TIMEOUT_S),
        PODSERVE_DB_BREAKER_RESET_S="1",
    )
    with ServerProcess(db_models, workers=2, env=env) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _by_ids(ids: list, **params: object) -> dict:
    return {"parameters": {"entity_ids": ids, **params}}


def _raw(rows: list[list[float]]) -> dict:
    return {"inputs": [{"name": "x", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}]}


def test_entity_ids_give_the_same_answer_as_the_tensors(client: httpx.Client) -> None:
    ids = ["e1", "e7", "e1", "e150"]
    expected = client.post(
        "/v2/models/affine/infer", json=_raw([_vector(1), _vector(7), _vector(1), _vector(150)])
    )
    response = client.post("/v2/models/affine/infer", json=_by_ids(ids))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == expected.json()["outputs"]
    np.testing.assert_allclose(
        np.array(response.json()["outputs"][0]["data"]).reshape(4, 4),
        3 * np.array([_vector(1), _vector(7), _vector(1), _vector(150)], np.float32),
    )
    assert "features" in parse_server_timing(response.headers["server-timing"])

    v1 = client.post("/v2/models/affine/versions/1/infer", json=_by_ids(["e2"]))
    assert v1.json()["outputs"][0]["data"] == [2 * v + 1 for v in _vector(2)]

    kserve_v1 = client.post("/v1/models/affine:predict", json={"entity_ids": ["e3", "e4"]})
    assert kserve_v1.status_code == 200, kserve_v1.text
    assert kserve_v1.json() == {
        "predictions": [[3 * v for v in _vector(3)], [3 * v for v in _vector(4)]]
    }


def test_feature_set_from_parquet_with_integer_ids(client: httpx.Client) -> None:
    response = client.post("/v2/models/affine/infer", json=_by_ids([5, "6"], feature_set="alt"))
    assert response.status_code == 200, response.text
    data = np.array(response.json()["outputs"][0]["data"]).reshape(2, 4)
    np.testing.assert_allclose(data, 30 * np.array([_vector(5), _vector(6)]), rtol=1e-6)
    v1 = client.post("/v1/models/affine:predict", json={"entity_ids": [5], "feature_set": "alt"})
    assert v1.json()["predictions"][0] == pytest.approx([30 * v for v in _vector(5)])


def test_unknown_ids_are_a_404_that_lists_them(client: httpx.Client) -> None:
    response = client.post("/v2/models/affine/infer", json=_by_ids(["e1", "ghost-1", "ghost-2"]))
    assert response.status_code == 404
    error = response.json()["error"]
    assert "'ghost-1'" in error and "'ghost-2'" in error and "'e1'" not in error
    assert "2 of 3" in error
    v1 = client.post("/v1/models/affine:predict", json={"entity_ids": ["nobody"]})
    assert v1.status_code == 404 and "'nobody'" in v1.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/affine/infer", _raw([[1, 2, 3, 4]]) | _by_ids(["e1"]), 400, "not both"),
        ("/v2/models/affine/infer", _by_ids([]), 400, "non-empty list"),
        ("/v2/models/affine/infer", _by_ids([1.5]), 400, "strings or integers"),
        ("/v2/models/affine/infer", _by_ids(["e1"], feature_set=""), 400, "feature_set"),
        (
            "/v2/models/affine/infer",
            _by_ids(["w1"], feature_set="wide"),
            400,
            "width 5; input 'x' expects 4",
        ),
        ("/v2/models/affine/infer", _by_ids(["e1"] * 1025), 413, "exceed the limit"),
        (
            "/v2/models/slow/infer",
            _by_ids(["e1"], feature_set="affine"),
            400,
            "width 4; input 'x' expects 256",
        ),
        ("/v1/models/affine:predict", {"entity_ids": "e1"}, 400, "non-empty list"),
        # PostgreSQL text cannot hold U+0000: the driver's error was a 500
        ("/v2/models/affine/infer", _by_ids(["e\x001"]), 400, "'entity_ids' must not contain"),
        (
            "/v2/models/affine/infer",
            _by_ids(["e1"], feature_set="aff\x00ine"),
            400,
            "'feature_set' must not contain",
        ),
        ("/v1/models/affine:predict", {"entity_ids": ["\x00"]}, 400, "U+0000"),
    ],
    ids=[
        "both",
        "empty",
        "float id",
        "empty set",
        "width",
        "too many",
        "model width",
        "v1 str",
        "nul id",
        "nul set",
        "v1 nul id",
    ],
)
def test_bad_lookups_get_a_clear_4xx(
    client: httpx.Client, path: str, body: dict, status: int, message: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_slow_query_is_a_504(client: httpx.Client, db_url: str) -> None:
    """A lock holds the feature query past the timeout: 504, and the server recovers."""
    locked = threading.Event()
    release = threading.Event()

    async def hold_lock() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE podserve_features IN ACCESS EXCLUSIVE MODE")
                locked.set()
                while not release.is_set():
                    await __import__("asyncio").sleep(0.01)
        finally:
            await conn.close()

    holder = threading.Thread(target=postgres.run, args=(hold_lock(),))
    holder.start()
    try:
        assert locked.wait(10)
        started = time.perf_counter()
        response = client.post("/v2/models/affine/infer", json=_by_ids(["e9"]))
        elapsed = time.perf_counter() - started
    finally:
        release.set()
        holder.join(10)
    assert response.status_code == 504, response.text
    assert "feature lookup took longer" in response.json()["error"]
    assert FEATURES_TIMEOUT_S * 0.9 <= elapsed < FEATURES_TIMEOUT_S + 0.5
    assert client.post("/v2/models/affine/infer", json=_by_ids(["e9"])).status_code == 200


def _timed_post(http: httpx.Client, body: dict) -> tuple[int, float, str]:
    started = time.perf_counter()
    response = http.post("/v2/models/affine/infer", json=body)
    return response.status_code, time.perf_counter() - started, response.text


@pytest.mark.parametrize("outage", ["cut", "blackhole"])
def test_database_down_is_a_fast_503_while_raw_requests_keep_working(
    server: ServerProcess, proxy: TcpProxy, outage: str
) -> None:
    """cut: the server is gone (errors at once); blackhole: a dead network (only timeouts)."""
    raw = _raw([_vector(1)])
    clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            before = list(pool.map(lambda i: _timed_post(clients[i % 4], raw), range(200)))
            getattr(proxy, outage)()
            try:
                # 40 lookups from 4 clients at once: none may wait beyond the timeout.
                lookups = list(
                    pool.map(lambda i: _timed_post(clients[i % 4], _by_ids(["e1"])), range(40))
                )
                during = list(pool.map(lambda i: _timed_post(clients[i % 4], raw), range(200)))
            finally:
                proxy.restore()
        # Requests on a connection when the network died (and the breaker's one-at-a-time
        # probes) time out: 504; the others are 503s, at once while the breaker is open.
        statuses = [status for status, _, _ in lookups]
        assert set(statuses) <= {503, 504}, lookups[:5]
        waited = sum(t > 0.1 for _, t, _ in lookups)
        assert waited <= 12, lookups  # at most a first wave per worker, then probes
        assert all("database unavailable" in text for status, _, text in lookups if status == 503)
        if outage == "cut":
            assert set(statuses) == {503}
        slowest = max(t for _, t, _ in lookups)
        fail_fast = statistics.median(t for _, t, _ in lookups[10:])
        assert slowest < FEATURES_TIMEOUT_S + 0.25, slowest
        assert fail_fast < 0.05, fail_fast  # the breaker is open: no waiting at all
        assert {status for status, _, _ in before + during} == {200}
        p50_before = statistics.median(t for _, t, _ in before)
        p50_during = statistics.median(t for _, t, _ in during)
        print(
            f"\nDB {outage}: slowest answer {slowest * 1000:.1f} ms, median "
            f"{fail_fast * 1000:.1f} ms; raw p50 {p50_before * 1000:.2f} ms before, "
            f"{p50_during * 1000:.2f} ms during"
        )
        assert p50_during < max(2 * p50_before, p50_before + 0.005)

        deadline = time.monotonic() + 10  # breaker reset (1 s) + reconnect
        while True:
            status, _, text = _timed_post(clients[0], _by_ids(["e1"]))
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 200, text
    finally:
        for http in clients:
            http.close()


def test_in_process_cache_saves_round_trips(loaded: str) -> None:
    settings = Settings(
        database_url=loaded, features_cache_size=3, features_cache_ttl_s=60, db_pool_min=0
    )

    async def scenario() -> tuple[int, int, int]:
        db = Database(settings)
        await db.open()
        store = FeatureStore(db, settings)
        try:
            first = await store.vectors("affine", ["e1", "e2"])
            again = await store.vectors("affine", ["e1", "e2"])
            assert first.keys() == again.keys() == {"e1", "e2"}
            np.testing.assert_array_equal(again["e2"], np.array(_vector(2), np.float32))
            queries_after_hits = store.queries
            await store.vectors("affine", ["e3", "e4"])  # evicts e1 (LRU, 3 entries)
            await store.vectors("affine", ["e1"])
            return queries_after_hits, store.queries, len(store.cache)  # type: ignore[arg-type]
        finally:
            await db.close()

    after_hits, total, size = postgres.run(scenario())
    assert after_hits == 1  # the second lookup came from the cache
    assert total == 3 and size == 3


def test_ttl_cache_expires_entries() -> None:
    cache = TtlCache(max_entries=10, ttl_s=0.05)
    cache.put(("s", "a"), np.zeros(2))
    assert cache.get(("s", "a")) is not None
    time.sleep(0.06)
    assert cache.get(("s", "a")) is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_loader_rejects_bad_files(db_url: str, tmp_path: Path) -> None:
    """Each bad file: exit 2 and one line naming what is wrong, no traceback, nothing stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad.csv").write_text("entity_id,a,b\nx,1,oops\n")
    # finite as a float64, not as the column's float32
    (tmp_path / "huge.csv").write_text("entity_id,a\nx,1\ny,-1e39\n")
    (tmp_path / "latin1.csv").write_bytes(b"entity_id,a\nu1,1\ncaf\xe9,2\n")
    # a null id was stored as an entity named "None"
    pq.write_table(pa.table({"entity_id": ["u1", None], "a": [1.0, 2.0]}), tmp_path / "null.pq")
    pq.write_table(pa.table({"entity_id": ["u1"], "a": ["x"]}), tmp_path / "strings.parquet")
    (tmp_path / "not.parquet").write_text("not a parquet file")
    (tmp_path / "f.json").write_text("{}")
    for name, message in (
        ("bad.csv", "bad.csv:2"),
        ("huge.csv", "huge.csv:3: a value beyond the float32"),
        ("latin1.csv", "not UTF-8 text"),
        ("null.pq", "empty or missing entity ids"),
        ("strings.parquet", "value columns must be numeric"),
        ("not.parquet", "not a readable Parquet file"),
        ("f.json", "unsupported file type"),
    ):
        result = subprocess.run(
            [*PODSERVE, "features", "load", str(tmp_path / name), "--set", "s",
             "--database-url", db_url],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
    assert (
        postgres.scalar(db_url, "SELECT count(*) FROM podserve_features WHERE feature_set = 's'")
        == 0
    )
