"""Scenario 2: SIGKILL one Gunicorn worker under load.

Gunicorn replaces the worker; the pod stays ready (the other worker answers the readiness
probe); the only failed requests are those of clients whose connection the killed worker
held, one each: the request in flight (or one sent into its closing connection); a reconnect
waits on the worker's slot socket, which outlives it (slot_listeners.py); and every answered
request has its prediction-log row.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import postgres
import soak
from server_process import ServerProcess
from tcp_proxy import TcpProxy
from traffic import RecordedLoad, Report

USERS = 8


class Prober:
    """A kubelet-like readiness probe: a new connection every 50 ms, 1 s timeout."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[float, int | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status: int | None = httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code
            except httpx.HTTPError:
                status = None
            self.results.append((started, status))
            time.sleep(0.05)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def longest_failure_streak(self) -> int:
        streak = longest = 0
        for _, status in self.results:
            streak = streak + 1 if status != 200 else 0
            longest = max(longest, streak)
        return longest


@pytest.fixture()
def logged_server(model_repo: Path, rel_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    with TcpProxy(*postgres.host_port(rel_db)) as proxy:
        env = postgres.server_env(postgres.with_port(rel_db, proxy.port), tmp_path / "spool")
        with ServerProcess(model_repo, workers=2, env=env) as server:
            yield server


def _wait_for_replacement(server: ServerProcess, killed: int, timeout: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pids = server.worker_pids()
        if killed not in pids and len(pids) == 2:
            return time.monotonic() - started
        time.sleep(0.02)
    raise TimeoutError(f"worker {killed} was not replaced")


def _wait_until_serving(server: ServerProcess, pid: int, timeout: float = 60) -> None:
    """New connections (the load keeps its own) until the new worker answers one."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{server.url}/v2/health/ready", timeout=2)
            if response.headers.get("x-podserve-worker") == str(pid):
                return
        time.sleep(0.02)
    raise TimeoutError(f"worker {pid} never answered")


def test_sigkill_one_worker_under_load(
    logged_server: ServerProcess, rel_db: str, report: Report
) -> None:
    server = logged_server
    load = RecordedLoad(server.port, {"raw": soak.request_maker("tabular")}, {"raw": USERS})
    with Prober(server.url) as prober, load:
        time.sleep(2.0)
        before = server.worker_pids()
        victim = before[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        respawn_s = _wait_for_replacement(server, victim)
        new_pid = next(p for p in server.worker_pids() if p not in before)
        _wait_until_serving(server, new_pid)
        serving_s = time.monotonic() - killed_at
        time.sleep(1.0)
    server.stop()  # flushes the surviving workers' prediction-log buffers

    bound = {s.user for s in _last_answer_per_user(load, killed_at) if s.worker == str(victim)}
    failed = load.select(where=lambda s: s.status != 200)
    answered = load.answered_ids()
    logged = {
        r["client_request_id"]
        for r in postgres.query(
            rel_db,
            "SELECT client_request_id FROM podserve_prediction_log "
            "WHERE client_request_id = ANY($1::text[])",
            list(answered),
        )
    }
    lost = answered - logged
    lost_by_victim = {
        s.request_id for s in load.samples if s.request_id in lost and s.worker == str(victim)
    }
    report(
        "worker_crash",
        sent=len(load.samples),
        failed=len(failed),
        failures={
            f"{s.status or s.error}": sum(
                1 for x in failed if (x.status or x.error) == (s.status or s.error)
            )
            for s in failed
        },
        failed_by_user={
            user: [s.status or s.error for s in failed if s.user == user]
            for user in sorted({s.user for s in failed})
        },
        connections_on_killed_worker=len(bound),
        respawn_s=round(respawn_s, 2),
        new_worker_serving_after_s=round(serving_s, 2),
        probes=len(prober.results),
        probes_failed=sum(1 for _, s in prober.results if s != 200),
        rows_answered=len(answered),
        rows_logged=len(logged),
        rows_lost=len(lost),
        rows_lost_answered_by_killed_worker=len(lost_by_victim),
    )
    assert len(load.samples) > 200
    # Errors: only users whose connection the killed worker held, and only around the kill.
    # Each loses at most its request in flight. (Before slot_listeners.py a second one could
    # fail: a reconnect queued on the dying worker's own listener, reset when it closed. Its
    # slot's socket now stays open, and the surviving worker serves it until the replacement
    # does.)
    failed_per_user = Counter(s.user for s in failed)
    assert set(failed_per_user) <= bound, (failed_per_user, bound)
    assert max(failed_per_user.values(), default=0) <= 1, failed_per_user
    assert all(killed_at - 1 <= s.started <= killed_at + 2 for s in failed), failed
    assert all(s.status is None for s in failed), failed  # no 5xx from the surviving worker
    # The pod stayed ready: no probe said 503 and none failed twice in a row (a kubelet
    # marks a pod unready after 3 failures by default).
    assert all(status in (200, None) for _, status in prober.results), prober.results
    assert prober.longest_failure_streak() <= 1, prober.results
    assert lost <= lost_by_victim, "rows of requests answered by a surviving worker are lost"
    # Rows the killed worker still held in memory are in its journal (one write() per row,
    # kept by the kernel); the respawned worker moves them to the spool and replays them.
    assert not lost, f"{len(lost)} rows answered by the SIGKILLed worker were lost"


def _last_answer_per_user(load: RecordedLoad, before: float) -> list:
    last = {}
    for sample in load.select(until=before, where=lambda s: s.status == 200):
        last[sample.user] = sample
    return list(last.values())
