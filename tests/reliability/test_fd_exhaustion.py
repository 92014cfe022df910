"""Scenario: a worker out of file descriptors (EMFILE), filled by a flood of idle connections.

Each worker's descriptor limit is lowered (prlimit) to a few dozen above what it uses, so a
few hundred silent connections exhaust it. At the limit, uvloop (libuv's reserve-descriptor
trick) accepts and at once closes each new connection; the connections already open go on
being served, and accepting resumes as soon as descriptors are free again.

A worker whose neighbour exits while it is at its limit must survive: it then serves the
neighbour's slot socket too (slot_listeners.Cover), which takes a descriptor (dup). That
EMFILE ended its tick, and with it the worker: one crash took down the other worker too.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from server_process import ServerProcess
from traffic import Report

FD_HEADROOM = 64  # descriptors above a worker's current use: its limit during the flood
MAX_FLOOD = 1500  # bounds the connections opened, whatever the kernel's hashing does
# Silent connections are closed by the header guard after PODSERVE_HEADER_READ_TIMEOUT_S:
# long enough that the flood outlasts each test.
ENV = {"PODSERVE_HEADER_READ_TIMEOUT_S": "120"}


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _limit_fds(pids: list[int]) -> dict[int, int]:
    """Each worker's soft and hard descriptor limit: FD_HEADROOM above what it uses now."""
    limits = {pid: _open_fds(pid) + FD_HEADROOM for pid in pids}
    for pid, limit in limits.items():
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    return limits


@contextmanager
def _flood(port: int, limits: dict[int, int]) -> Iterator[int]:
    """Idle connections until every worker in `limits` is at its limit; closed on exit."""
    with ExitStack() as stack:
        opened = 0
        while opened < MAX_FLOOD and not _all_full(limits):
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            opened += 1
            if opened % 50 == 0:
                time.sleep(0.05)  # let the workers accept what is queued
        time.sleep(0.5)
        assert _all_full(limits), {pid: _open_fds(pid) for pid in limits}
        yield opened


def _all_full(limits: dict[int, int]) -> bool:
    return all(_open_fds(pid) >= limit for pid, limit in limits.items())


def _new_connection_status(url: str) -> int | str:
    try:
        return httpx.get(f"{url}/v2/health/live", timeout=2).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def _reached_by_new_connection(url: str, pid: int, timeout: float = 15) -> bool:
    """A new connection (not a kept-alive one) is answered by worker `pid`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/v2/health/live", timeout=2)
            if response.headers.get("x-podserve-worker") == str(pid):
                return True
        except httpx.HTTPError:
            time.sleep(0.05)
    return False


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_exhausted_worker_serves_on_and_accepts_again(affine_repo: Path, report: Report) -> None:
    with ServerProcess(affine_repo, workers=1, env=ENV) as server:
        (pid,) = server.worker_pids()
        kept = httpx.Client(base_url=server.url, timeout=5)
        assert kept.get("/v2/health/live").status_code == 200
        limits = _limit_fds([pid])
        log_before = len(server.logs())
        with _flood(server.port, limits) as opened:
            cpu_before, began = _cpu_s(pid), time.monotonic()
            refused = [_new_connection_status(server.url) for _ in range(5)]
            served = [kept.get("/v2/health/live").status_code for _ in range(5)]
            time.sleep(2)
            cpu_share = (_cpu_s(pid) - cpu_before) / (time.monotonic() - began)
            log_lines = server.logs()[log_before:].count("\n")
        recovered = _reached_by_new_connection(server.url, pid)
        report(
            "fd_exhaustion",
            limit=limits[pid],
            flood=opened,
            new_connections=refused,
            kept_alive=served,
            cpu_share=round(cpu_share, 3),
            log_lines=log_lines,
            recovered=recovered,
        )
        # A new connection is closed unanswered (no liveness answer the worker cannot back).
        assert all(status != 200 for status in refused), refused
        assert served == [200] * 5  # a kept-alive connection is served throughout
        assert cpu_share < 0.25  # idles, no accept() spin (2 s of a busy loop would be ~1)
        assert log_lines <= 2, server.logs()[log_before:][-3000:]  # no line per connection
        assert recovered  # accepts again once descriptors are free


def test_exhausted_worker_survives_its_neighbours_exit(affine_repo: Path, report: Report) -> None:
    # Balancing off: the survivor, holding most connections once the replacement serves,
    # would close its surplus, the kept one included (connection_balance.py).
    env = {**ENV, "PODSERVE_BALANCE_CONNECTIONS": "false"}
    with ServerProcess(affine_repo, workers=2, env=env) as server:
        kept = {
            c.get("/v2/health/live").headers["x-podserve-worker"]: c
            for c in server.client_per_worker()
        }
        survivor, victim = (int(pid) for pid in sorted(kept))
        limits = _limit_fds([survivor, victim])
        log_before = len(server.logs())
        with _flood(server.port, limits) as opened:
            os.kill(victim, signal.SIGKILL)
            # The survivor serves the victim's slot until the replacement does, every tick
            # (0.1 s) it tries; the replacement boots in well under a second.
            deadline = time.monotonic() + 3
            served = []
            while time.monotonic() < deadline:
                served.append(_kept_answer(kept[str(survivor)]))
                time.sleep(0.2)
            alive = survivor in server.worker_pids()
            logs = server.logs()[log_before:]
        recovered = alive and _reached_by_new_connection(server.url, survivor)
        report(
            "fd_exhaustion_neighbour_exit",
            limits=list(limits.values()),
            flood=opened,
            survivor_alive=alive,
            kept_alive=sorted(set(served)),
            cover_warnings=logs.count("cannot take the connections of slot"),
            recovered=recovered,
        )
        assert alive, logs[-4000:]
        assert set(served) == {f"200 from {survivor}"}, served
        assert logs.count("cannot take the connections of slot") <= 1  # once, not per tick
        assert recovered


def _kept_answer(client: httpx.Client) -> str:
    """Status and answering worker (httpx reconnects, maybe to another worker, if it must)."""
    try:
        response = client.get("/v2/health/live")
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return f"{response.status_code} from {response.headers.get('x-podserve-worker')}"
