"""Durable background jobs: 202 + Location, polling, leases, SIGKILL of a worker mid-run."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

import postgres
from podserve.db.jobs import ClaimedJob, JobStore
from podserve.db.pool import Database
from podserve.settings import Settings
from server_process import ServerProcess
from tcp_proxy import TcpProxy

LEASE_S = 2.0
JOBS = 200


def _affine(rows: list[list[float]]) -> dict:
    return {"inputs": [{"name": "x", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}]}


def _slow(i: int, rows: int = 2) -> dict:
    """`rows` rows of the slow model: ~12 ms of CPU each, so a kill lands while jobs run."""
    data = [((i * 7 + j) % 13) / 13 for j in range(rows * 256)]
    return {
        "id": f"job-{i}",
        "inputs": [{"name": "x", "shape": [rows, 256], "datatype": "FP32", "data": data}],
    }


@pytest.fixture(scope="module")
def server(
    db_url: str, db_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = postgres.server_env(
        db_url,
        tmp_path_factory.mktemp("spool"),
        PODSERVE_JOBS_LEASE_S=str(LEASE_S),
        PODSERVE_JOBS_POLL_MS="100",
        PODSERVE_JOBS_RESULT_TTL_S="3600",
    )
    with ServerProcess(db_models, workers=2, env=env) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _wait_done(client: httpx.Client, location: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(location).json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_submit_poll_and_fetch_the_result(client: httpx.Client, db_url: str) -> None:
    body = _affine([[1, 2, 3, 4], [0, 0, 0, 1]]) | {"id": "mine"}
    response = client.post("/v2/models/affine/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v2/jobs/{job_id}"
    assert response.json()["status"] == "queued"
    job = _wait_done(client, response.headers["location"])
    assert job["status"] == "succeeded", job
    online = client.post("/v2/models/affine/infer", json=body).json()
    assert job["result"] == online  # same answer as the online endpoint, version pinned
    assert job["attempts"] == 1 and job["model_version"] == "2"
    assert job["finished_at"] >= job["started_at"] >= job["created_at"]
    # Logged once, atomically with the result, under the job id.
    rows = postgres.query(
        db_url,
        "SELECT model_version, client_request_id FROM "
        "podserve_prediction_log WHERE request_id = $1::uuid",
        job_id,
    )
    assert [tuple(r) for r in rows] == [("2", "mine")]

    pinned = client.post("/v2/models/affine/versions/1/jobs", json=_affine([[1, 1, 1, 1]]))
    done = _wait_done(client, pinned.headers["location"])
    assert done["result"]["outputs"][0]["data"] == [3.0, 3.0, 3.0, 3.0]


def test_binary_outputs_are_stored_as_json(client: httpx.Client) -> None:
    body = _affine([[1, 2, 3, 4]]) | {"parameters": {"binary_data_output": True}}
    response = client.post("/v2/models/affine/jobs", json=body)
    job = _wait_done(client, response.headers["location"])
    assert job["result"]["outputs"][0]["data"] == [3.0, 6.0, 9.0, 12.0]


def test_a_job_can_ask_for_top_classes(client: httpx.Client) -> None:
    body = _affine([[1, 2, 3, 4]]) | {
        "outputs": [{"name": "y", "parameters": {"classification": 2}}]
    }
    response = client.post("/v2/models/affine/jobs", json=body)
    job = _wait_done(client, response.headers["location"])
    (output,) = job["result"]["outputs"]  # y = 3x = [3, 6, 9, 12]: the top two, by index
    assert (output["datatype"], output["shape"], output["data"]) == ("BYTES", [1, 2],
                                                                    ["12:3", "9:2"])  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/nope/jobs", _affine([[1, 2, 3, 4]]), 404, "unknown model"),
        ("/v2/models/affine/versions/7/jobs", _affine([[1, 2, 3, 4]]), 404, "no version"),
        ("/v2/models/affine/jobs", _affine([[1, 2, 3]]), 400, "data has 3"),
        ("/v2/models/affine/jobs", {}, 400, "'inputs'"),
        ("/v2/models/nope/jobs", {}, 404, "unknown model"),
        (
            "/v2/models/affine/jobs",
            _affine([[1, 2, 3, 4]])
            | {"outputs": [{"name": "y", "parameters": {"classification": 0}}]},
            400,
            "positive integer",
        ),
        # what the same request online gets: a 413 at once, not a job that fails later
        (
            "/v2/models/affine/jobs",
            {"parameters": {"entity_ids": [f"e{i}" for i in range(1025)]}},
            413,
            "1025 entity ids exceed the limit of 1024",
        ),
    ],
    ids=[
        "model",
        "version",
        "shape",
        "no inputs",
        "model before body",
        "classification",
        "ids",
    ],
)
def test_invalid_jobs_are_refused_at_submission(
    client: httpx.Client, path: str, body: dict, status: int, message: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_unknown_and_expired_jobs_are_404(client: httpx.Client, db_url: str) -> None:
    assert client.get("/v2/jobs/not-a-uuid").status_code == 404
    missing = client.get("/v2/jobs/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404 and "no job" in missing.json()["error"]
    response = client.post("/v2/models/affine/jobs", json=_affine([[1, 2, 3, 4]]))
    location = response.headers["location"]
    assert _wait_done(client, location)["status"] == "succeeded"
    postgres.query(
        db_url,
        "UPDATE podserve_jobs SET expires_at = now() - interval '1 second' WHERE id = $1::uuid",
        response.json()["id"],
    )
    assert client.get(location).status_code == 404  # past its TTL

    async def purge() -> int:
        settings = Settings(database_url=db_url, db_pool_min=0)
        db = Database(settings)
        await db.open()
        try:
            return await JobStore(db, settings).purge_expired()
        finally:
            await db.close()

    assert postgres.run(purge()) >= 1
    assert (
        postgres.scalar(
            db_url, "SELECT count(*) FROM podserve_jobs WHERE id = $1::uuid", response.json()["id"]
        )
        == 0
    )


def test_a_lost_commit_does_not_hold_the_job(db_url: str) -> None:
    """The path to PostgreSQL dies between a job's result UPDATE and its COMMIT: PostgreSQL
    keeps that session idle in transaction, holding the job's row lock (other workers' claims
    skip it, the retry waits on it). The transaction's idle_in_transaction_session_timeout
    must end the orphan, so the retried store succeeds within seconds."""
    import asyncio

    owner = "lost-commit-test"

    async def scenario(proxy: TcpProxy) -> dict[str, object]:
        settings = postgres.lost_commit_settings(db_url, proxy.port)
        db = Database(settings)
        await db.open()
        store = JobStore(db, settings)
        job_id = await store.submit("affine", "1", b"{}", 2)
        await asyncio.to_thread(  # held by this test, with a lease no one else takes over
            postgres.query,
            db_url,
            "UPDATE podserve_jobs SET status = 'running', attempts = 1, lease_owner = $2, "
            "lease_expires_at = now() + interval '1 hour' WHERE id = $1",
            job_id,
            owner,
        )
        job = ClaimedJob(job_id, "affine", "1", b"{}", 2, 1)
        proxy.sever_at(b"COMMIT;")
        try:
            first = repr(await store.succeed(job, owner, b"[1]", None))
        except TimeoutError:
            first = "timeout"
        stored, seconds = await postgres.retry_past_orphan(
            lambda: store.succeed(job, owner, b"[1]", None)
        )
        await db.close()
        status = await asyncio.to_thread(
            postgres.scalar, db_url, "SELECT status FROM podserve_jobs WHERE id = $1", job_id
        )
        return {
            "first": first,
            "severed": proxy.severed,
            "stored": stored,
            "seconds": seconds,
            "status": status,
        }

    with TcpProxy(*postgres.host_port(db_url)) as proxy:
        stats = postgres.run(scenario(proxy))
    assert stats["first"] == "timeout" and stats["severed"] == 1, stats
    assert stats["stored"] is True and stats["seconds"] < 5, stats
    assert stats["status"] == "succeeded", stats


def test_a_job_that_cannot_run_fails_with_a_reason(client: httpx.Client, db_url: str) -> None:
    # Entity ids that are not in the feature store: valid at submission, 404 when run.
    response = client.post(
        "/v2/models/affine/jobs", json={"parameters": {"entity_ids": ["nobody"]}}
    )
    assert response.status_code == 202, response.text
    job = _wait_done(client, response.headers["location"])
    assert job["status"] == "failed" and "'nobody'" in job["error"]
    assert "result" not in job


def _expected_slow(models: Path, bodies: list[dict]) -> np.ndarray:
    session = ort.InferenceSession(str(models / "slow" / "1" / "model.onnx"))
    x = np.array([b["inputs"][0]["data"] for b in bodies], np.float32).reshape(-1, 256)
    return session.run(None, {"x": x})[0].reshape(len(bodies), -1)


def test_200_jobs_complete_once_despite_a_sigkilled_worker(
    pg_server: postgres.PostgresServer, db_models: Path, tmp_path: Path
) -> None:
    """An API-only server takes the 200 jobs; a 2-worker server runs them and loses a worker."""
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        env = postgres.server_env(
            url, tmp_path, PODSERVE_JOBS_LEASE_S=str(LEASE_S), PODSERVE_JOBS_POLL_MS="100"
        )
        bodies = [_slow(i) for i in range(JOBS)]
        api_only = env | {"PODSERVE_JOBS_CONCURRENCY": "0"}
        with (
            ServerProcess(db_models, workers=1, env=api_only) as api,
            httpx.Client(base_url=api.url, timeout=30) as http,
        ):
            responses = [http.post("/v2/models/slow/jobs", json=body) for body in bodies]
        assert {r.status_code for r in responses} == {202}
        ids = [r.json()["id"] for r in responses]
        assert (
            postgres.scalar(url, "SELECT count(*) FROM podserve_jobs WHERE status = 'queued'")
            == JOBS
        )
        with ServerProcess(db_models, workers=2, env=env) as runners:
            _kill_a_worker_mid_job_and_check(runners, url, ids, bodies, db_models)


def _count_done(url: str, ids: list[str]) -> int:
    return postgres.scalar(
        url,
        "SELECT count(*) FROM podserve_jobs WHERE status = 'succeeded' AND id = ANY($1::uuid[])",
        ids,
    )


def _count_running(url: str) -> int:
    return postgres.scalar(url, "SELECT count(*) FROM podserve_jobs WHERE status = 'running'")


def _freeze_a_worker_holding_a_job(
    server: ServerProcess, url: str, ids: list[str]
) -> tuple[int, list[str]]:
    """SIGSTOP a worker; keep it frozen if it holds a running job (it cannot finish it now)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _count_done(url, ids) < JOBS // 10:  # let a good number finish first
            time.sleep(0.05)
            continue
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGSTOP)
            held = [
                r["id"]
                for r in postgres.query(
                    url,
                    "SELECT id::text FROM podserve_jobs WHERE status = 'running' "
                    "AND split_part(lease_owner, ':', 2) = $1 AND id = ANY($2::uuid[])",
                    str(pid),
                    ids,
                )
            ]
            if held:
                return pid, held
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("no worker was seen holding a job")


def _kill_a_worker_mid_job_and_check(
    server: ServerProcess, url: str, ids: list[str], bodies: list[dict], models: Path
) -> None:
    victim, orphans = _freeze_a_worker_holding_a_job(server, url, ids)
    done_before = _count_done(url, ids)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        statuses = postgres.query(
            url,
            "SELECT status, count(*) FROM podserve_jobs WHERE id = ANY($1::uuid[]) GROUP BY status",
            ids,
        )
        counts = {r["status"]: r["count"] for r in statuses}
        if counts.get("succeeded", 0) + counts.get("failed", 0) == JOBS:
            break
        time.sleep(0.2)
    all_done_s = time.monotonic() - killed_at
    assert counts == {"succeeded": JOBS}, counts
    assert done_before < JOBS, "the kill should land mid-way"

    rows = postgres.query(
        url, "SELECT id::text, attempts FROM podserve_jobs WHERE id = ANY($1::uuid[])", ids
    )
    attempts = {r["id"]: r["attempts"] for r in rows}
    # The killed worker's job was run again once its lease ran out.
    assert [attempts[job] for job in orphans] == [2] * len(orphans), (orphans, attempts)
    expected = _expected_slow(models, bodies)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for index, job_id in enumerate(ids):
            result = http.get(f"/v2/jobs/{job_id}").json()["result"]
            assert result["id"] == f"job-{index}"
            np.testing.assert_allclose(
                np.array(result["outputs"][0]["data"]).reshape(-1),
                expected[index],
                rtol=1e-4,
                atol=1e-5,
            )
    logged = postgres.query(
        url,
        "SELECT request_id::text, count(*) FROM "
        "podserve_prediction_log WHERE request_id = ANY($1::uuid[]) "
        "GROUP BY request_id",
        ids,
    )
    assert len(logged) == JOBS and {r["count"] for r in logged} == {1}  # each result once
    retried = sum(a > 1 for a in attempts.values())
    print(
        f"\njobs: {JOBS} queued, {done_before} done when worker {victim} was SIGKILLed "
        f"holding {len(orphans)}; all {JOBS} succeeded {all_done_s:.1f} s later; "
        f"{retried} ran more than once"
    )
    server.wait_ready(60)  # Gunicorn replaced the killed worker


def test_sigterm_hands_running_jobs_back_at_once(
    pg_server: postgres.PostgresServer, db_models: Path, tmp_path: Path
) -> None:
    """A draining worker requeues its job (no lease wait, no attempt spent); the next runs it."""
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        env = postgres.server_env(
            url,
            tmp_path,
            PODSERVE_JOBS_POLL_MS="100",
            PODSERVE_JOBS_LEASE_S="600",  # a lease that would outlast us
            PODSERVE_MAX_QUEUE_ROWS="1024",  # room for the long jobs below
        )
        # ~2-5 s each (machines differ 2.6x): well past the 0.5 s drain grace, however late
        # in a job the SIGTERM lands (192 rows took 0.8 s on a fast machine, and it finished).
        bodies = [_slow(i, rows=448) for i in range(4)]
        api_only = env | {"PODSERVE_JOBS_CONCURRENCY": "0"}
        with (
            ServerProcess(db_models, workers=1, env=api_only) as api,
            httpx.Client(base_url=api.url, timeout=30) as http,
        ):
            ids = [http.post("/v2/models/slow/jobs", json=body).json()["id"] for body in bodies]
        first = ServerProcess(db_models, workers=1, env=env).start()
        try:
            # One job done and the next one claimed: SIGTERM between the two would find
            # nothing running (CI once stopped the worker in that gap).
            deadline = time.monotonic() + 120  # a job takes 2-5 s, several times that loaded
            while not (_count_done(url, ids) >= 1 and _count_running(url) == 1):
                assert time.monotonic() < deadline, "the first worker never ran a second job"
                time.sleep(0.02)
        finally:
            first.stop()
        states = postgres.query(url, "SELECT status, attempts, started_at FROM podserve_jobs")
        assert "running" not in {r["status"] for r in states}, states
        handed_back = [r for r in states if r["status"] == "queued" and r["started_at"]]
        assert len(handed_back) == 1, states  # it was running at SIGTERM
        assert {r["attempts"] for r in states if r["status"] == "queued"} == {0}
        done_by_first = _count_done(url, ids)
        assert done_by_first < len(ids)
        with ServerProcess(db_models, workers=1, env=env):
            # Well within the 600 s lease (it was 50 s of a 60 s one: too short for 3 jobs of
            # 448 rows at a load average of 16)
            deadline = time.monotonic() + 300
            while _count_done(url, ids) < len(ids) and time.monotonic() < deadline:
                time.sleep(0.1)
        assert _count_done(url, ids) == len(ids)
        attempts = postgres.query(
            url, "SELECT attempts, count(*) FROM podserve_jobs GROUP BY attempts"
        )
        assert {r["attempts"]: r["count"] for r in attempts} == {1: len(ids)}
