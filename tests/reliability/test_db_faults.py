"""Scenario 4: the database stopped, slow, and resetting connections, under load.

Raw-tensor requests (no database on their path) and feature requests (entity ids looked up
in PostgreSQL) run side by side while the TCP proxy in front of PostgreSQL plays each fault
for a few seconds, with a recovery between faults. Raw-tensor inference is unaffected; feature
requests fail fast (503 / 504 within the feature timeout); once the database is back feature
requests succeed again, and after the run the prediction log holds exactly one row for every
answered request of either kind.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import postgres
import soak
from fault_proxy import FaultProxy
from server_process import ServerProcess
from traffic import RecordedLoad, Report, Sample

FEATURES_TIMEOUT_S = 0.5
ENTITIES = 200
FAULT_S = 3.0
RECOVER_S = 3.0
SLOW_DELAY_S = 0.4  # per chunk, each way: a lookup needs > 0.8 s, past the 0.5 s budget
FAULTS = {
    "stopped": lambda p: p.cut(),
    "slow": lambda p: p.slow(SLOW_DELAY_S),
    "reset": lambda p: p.reset(),
}


def _features_request() -> tuple[bytes, str | None]:
    request_id = uuid.uuid4().hex
    ids = random.sample(range(ENTITIES), random.randint(1, 4))
    body = json.dumps({"parameters": {"entity_ids": [f"e{i}" for i in ids]}}).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    return soak.encode("POST", "/v2/models/tabular/infer", body, headers), request_id


@pytest.fixture()
def featured_db(rel_db: str) -> str:
    rows = [("tabular", f"e{i}", [float(i % 7) / 7] * 30) for i in range(ENTITIES)]
    postgres.run(_insert(rel_db, rows))
    return rel_db


async def _insert(url: str, rows: list[tuple[str, str, list[float]]]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.executemany(
            'INSERT INTO podserve_features (feature_set, entity_id, "values") '
            "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            rows,
        )
    finally:
        await conn.close()


@pytest.fixture()
def db_server(
    model_repo: Path, featured_db: str, tmp_path: Path
) -> Iterator[tuple[ServerProcess, FaultProxy]]:
    with FaultProxy(*postgres.host_port(featured_db)) as proxy:
        env = postgres.server_env(
            postgres.with_port(featured_db, proxy.port),
            tmp_path / "spool",
            PODSERVE_FEATURES_TIMEOUT_S=str(FEATURES_TIMEOUT_S),
            PODSERVE_DB_BREAKER_RESET_S="1",
        )
        with ServerProcess(model_repo, workers=2, env=env) as server:
            yield server, proxy


def _p50_ms(samples: list[Sample]) -> float:
    return round(1000 * statistics.median(s.seconds for s in samples), 2) if samples else 0.0


def test_database_faults_under_load(
    db_server: tuple[ServerProcess, FaultProxy], featured_db: str, report: Report, tmp_path: Path
) -> None:
    server, proxy = db_server
    makers = {"raw": soak.request_maker("tabular"), "features": _features_request}
    phases: list[tuple[str, float, float]] = []
    # Feature clients back off 50 ms after an error, as real clients do (Retry-After says
    # more): without it they spin on instant 503s, thousands a second.
    load = RecordedLoad(server.port, makers, {"raw": 3, "features": 3}, 0.05)
    with load:
        start = time.monotonic()
        time.sleep(2.0)
        phases.append(("baseline", start, time.monotonic()))
        for name, fault in FAULTS.items():
            began = time.monotonic()
            fault(proxy)
            time.sleep(FAULT_S)
            restored = time.monotonic()
            proxy.restore()
            phases.append((name, began, restored))
            time.sleep(RECOVER_S)
            phases.append((f"after {name}", restored, time.monotonic()))
    server.stop()  # the prediction log flushes what it still holds
    # Rows the shutdown had to spool are durable; the next start replays them (a restarted pod).
    spooled = _spooled_ids(tmp_path / "spool")
    replay_log = _restart_and_replay(server, tmp_path / "spool") if spooled else ""

    answered = load.answered_ids()
    logged = postgres.query(
        featured_db,
        "SELECT client_request_id, count(*) AS n FROM "
        "podserve_prediction_log GROUP BY client_request_id",
    )
    counts = {r["client_request_id"]: r["n"] for r in logged}
    missing = answered - set(counts)
    figures = _figures(load, phases)
    report(
        "db_faults",
        phases=figures,
        sent=len(load.samples),
        failed_raw=sum(1 for s in load.select("raw") if s.status != 200),
        rows_answered=len(answered),
        rows_logged=sum(1 for i in answered if i in counts),
        duplicate_rows=sum(n - 1 for n in counts.values()),
        rows_spooled_at_shutdown=len(spooled),
        rows_left_in_spool=len(_spooled_ids(tmp_path / "spool")),
        missing_ids=sorted(missing)[:5],
        missing_kinds=sorted({s.kind for s in load.samples if s.request_id in missing}),
        resets=proxy.resets,
    )

    baseline = load.select("raw", *phases[0][1:])
    for name, began, ended in phases:
        raw = load.select("raw", began, ended)
        features = load.select("features", began, ended)
        assert raw and all(s.status == 200 for s in raw), (name, {s.status for s in raw})
        assert _p50_ms(raw) <= 2 * _p50_ms(baseline) + 10, (name, figures)
        if name in FAULTS:
            assert {s.status for s in features} <= {200, 503, 504}, (name, figures[name])
            assert any(s.status in (503, 504) for s in features), (name, figures[name])
            # Fail fast: nearly all within the timeout (+ scheduling slack on 2 shared cores),
            # none waiting out the fault. Stragglers happen under CI load, a pile-up must not.
            seconds = sorted(s.seconds for s in features)
            p90 = seconds[int(0.9 * (len(seconds) - 1))]
            assert p90 < FEATURES_TIMEOUT_S + 0.5, (name, p90)
            assert seconds[-1] < FAULT_S, (name, seconds[-1])
        elif name.startswith("after"):
            # Back to normal: the breaker has closed again (a probe after its 1 s reset) and
            # the pool reconnected; on a loaded 2-core machine a straggler may still time out.
            settled = [s for s in features if s.started >= ended - 1.0]
            ok = sum(1 for s in settled if s.status == 200)
            assert settled and ok >= 0.9 * len(settled), (name, figures[name])
    assert not missing, (
        f"{len(missing)} answered rows not logged ({len(spooled)} in the spool); "
        f"shutdown log:\n{server.logs()[-3000:]}\nreplay log:\n{replay_log[-6000:]}"
    )
    assert all(counts[i] == 1 for i in answered), "duplicate prediction-log rows"


def _restart_and_replay(server: ServerProcess, spool: Path, timeout: float = 65) -> str:
    """Start a fresh server on the same spool until it is replayed; its log, for failures.

    Replay normally ends within a second. The bound covers two of the writer's rescans
    (prediction_log.RESCAN_S): a segment whose claim failed at start waits for the next one.
    """
    env = {k: v for k, v in server.env.items() if k.startswith("PODSERVE_")}
    env.pop("PODSERVE_PORT")
    repo = Path(env["PODSERVE_MODEL_REPOSITORY"])
    with ServerProcess(repo, workers=server.workers, env=env) as replayer:  # as in production
        deadline = time.monotonic() + timeout
        while list(spool.glob("*.seg")) and time.monotonic() < deadline:
            time.sleep(0.1)
        return replayer.logs()


def _spooled_ids(spool: Path) -> set[str]:
    """Client request ids of rows still in spool segments (written, not yet replayed)."""
    from podserve.db.spool import decode_records

    ids = set()
    for segment in spool.glob("*.seg"):
        rows, _ = decode_records(segment.read_bytes(), segment)
        ids |= {row[1] for row in rows}
    return ids


def _figures(load: RecordedLoad, phases: list[tuple[str, float, float]]) -> dict:
    out = {}
    for name, began, ended in phases:
        raw = load.select("raw", began, ended)
        features = load.select("features", began, ended)
        statuses: dict[str, int] = {}
        for s in features:
            key = str(s.status or s.error)
            statuses[key] = statuses.get(key, 0) + 1
        first_ok = next((s.started - began for s in features if s.status == 200), None)
        last_bad = max((s.started - began for s in features if s.status != 200), default=None)
        out[name] = {
            "raw": len(raw),
            "raw_failed": sum(1 for s in raw if s.status != 200),
            "raw_p50_ms": _p50_ms(raw),
            "features": statuses,
            "features_max_ms": round(1000 * max((s.seconds for s in features), default=0), 1),
            "first_feature_200_after_s": round(first_ok, 2) if first_ok is not None else None,
            "last_feature_failure_after_s": round(last_bad, 2) if last_bad is not None else None,
        }
    return out
