"""Keep-alive connections evened out across workers (connection_balance.py)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
from gunicorn.config import Config

from load_client import AFFINE
from metrics_support import Scrape, scrape
from podserve.connection_balance import (
    FREE,
    NOT_SERVING,
    ConnectionBalancer,
    ConnectionTable,
    gunicorn_hooks,
)
from podserve.gunicorn_conf import chain_hooks
from podserve.metrics import REFRESH_S
from server_process import ServerProcess


def test_fair_share_counts_live_workers_only() -> None:
    table = ConnectionTable(6)
    assert table.fair_share() is None  # no worker
    a, b, c = table.claim(), table.claim(), table.claim()
    assert len({a, b, c}) == 3
    table.publish(a, 21)
    table.publish(b, 11)
    table.release(c)  # a dead worker's slot does not count
    assert table.fair_share() == 16
    table.publish(b, 12)
    assert table.fair_share() == 17  # ceil(33 / 2)
    table.release(b)
    assert table.fair_share() is None  # one worker: nothing to balance


def test_a_worker_beyond_a_full_table_serves_without_a_slot() -> None:
    import podserve.connection_balance as balance

    hooks = gunicorn_hooks(workers=1)  # 4 x 1 + 4 = 8 slots
    hooks["on_starting"](None)
    workers = [type("Worker", (), {})() for _ in range(9)]
    for worker in workers:
        hooks["pre_fork"](None, worker)
    assert [w.podserve_slot for w in workers] == [*range(8), None]
    hooks["child_exit"](None, workers[-1])  # nothing to give back
    assert balance._table is not None and balance._table.claim() is None


def test_balancer_closes_only_its_surplus_and_counts_closing_ones_out() -> None:
    table = ConnectionTable(4)
    busy = ConnectionBalancer(table, table.claim())
    idle = ConnectionBalancer(table, table.claim())
    busy.set_serving(True), idle.set_serving(True)
    for _ in range(21):
        busy.opened()
    for _ in range(11):
        idle.opened()
    decisions = [busy.should_close() for _ in range(21)]
    # 21 vs 11: the share is 16 (closed connections come back, so they still count in the
    # total); the busy worker closes its 5 surplus ones and then keeps the rest.
    assert decisions[:5] == [True] * 5 and not any(decisions[5:]), decisions
    assert busy.staying == 16 and busy.open == 21 and busy.closed_for_balance == 5
    assert not any(idle.should_close() for _ in range(11))  # under its share: never
    for _ in range(5):
        busy.lost(was_closing=True)  # the told connections go...
    for _ in range(3):
        idle.opened()  # ...and come back: 3 of them to the other worker
    busy.opened(), busy.opened()
    assert (busy.open, busy.staying, idle.open) == (18, 18, 14)
    assert [busy.should_close() for _ in range(3)] == [True, True, False]  # share 16 again
    assert not idle.should_close()


def test_a_disabled_balancer_counts_but_never_closes() -> None:
    table = ConnectionTable(4)
    busy = ConnectionBalancer(table, table.claim(), enabled=False)
    other = ConnectionBalancer(table, table.claim())
    busy.set_serving(True), other.set_serving(True), other.opened()
    for _ in range(9):
        busy.opened()
    assert not any(busy.should_close() for _ in range(9))
    assert table.fair_share() == 5 and busy.closed_for_balance == 0


def test_starting_and_draining_workers_are_out_of_the_share() -> None:
    """A worker loading its models must not draw connections (they would wait for it), and
    one that drains must not make the others close theirs."""
    table = ConnectionTable(4)
    busy = ConnectionBalancer(table, table.claim())
    starting = ConnectionBalancer(table, table.claim())
    busy.set_serving(True)
    for _ in range(8):
        busy.opened()
    assert table.fair_share() is None and not busy.should_close()  # alone in the share
    starting.opened()  # a probe reaches it before its start-up is done: still out
    assert table.fair_share() is None and not starting.should_close()
    starting.set_serving(True)
    assert table.fair_share() == 5 and busy.should_close()  # ceil(9 / 2): 8 is 3 over
    starting.set_serving(False)  # draining
    assert table.fair_share() is None and not busy.should_close()
    starting.lost(was_closing=False)
    assert table._counts[starting.slot] == NOT_SERVING  # its closing connections stay out


def test_a_stalled_workers_connections_are_out_of_the_share() -> None:
    """The others take a stalled worker's new connections (slot_listeners.Cover); measured
    against a share that counts the stalled one, they would close them again and again."""
    table = ConnectionTable(4)
    live, stalled = (
        ConnectionBalancer(table, table.claim()),
        ConnectionBalancer(table, table.claim()),
    )
    for balancer, connections in [(live, 12), (stalled, 4)]:
        balancer.set_serving(True)
        for _ in range(connections):
            balancer.opened()
    assert table.fair_share() == 8 and live.should_close()  # ceil(16 / 2): 12 is 4 over
    live.closing = live.closed_for_balance = 0
    live.stalled = frozenset({stalled.slot})
    assert table.fair_share(live.stalled) is None  # alone in the share
    assert not any(live.should_close() for _ in range(12))


def test_table_is_shared_with_forked_workers() -> None:
    table = ConnectionTable(4)
    parent, child = table.claim(), table.claim()
    table.publish(parent, 3)
    pid = os.fork()
    if pid == 0:  # the worker: publish into its slot, then leave without cleanup
        table.publish(child, 9)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.fair_share() == 6  # ceil((3 + 9) / 2): the child's store is visible here


def test_hooks_hand_out_and_take_back_slots() -> None:
    import podserve.connection_balance as balance

    hooks = gunicorn_hooks(workers=2)
    hooks["on_starting"](None)
    table = balance._table
    assert table is not None

    class Worker:
        pass

    first, second = Worker(), Worker()
    hooks["pre_fork"](None, first)
    hooks["pre_fork"](None, second)
    assert {first.podserve_slot, second.podserve_slot} == {0, 1}
    arbiter = SimpleNamespace(WORKERS={1: first}, num_workers=1)  # TTOU: one fewer
    hooks["child_exit"](arbiter, second)
    assert table._counts[second.podserve_slot] == FREE
    arbiter.WORKERS = {}  # the first exits too: Gunicorn forks a replacement next
    hooks["child_exit"](arbiter, first)
    assert table._counts[first.podserve_slot] == NOT_SERVING
    replacement = Worker()
    hooks["pre_fork"](None, replacement)  # takes the held slot
    assert replacement.podserve_slot == first.podserve_slot
    assert table._counts[first.podserve_slot] == NOT_SERVING  # until its start-up is done


def test_chained_hooks_call_each_in_order_with_gunicorns_arity() -> None:
    calls: list[str] = []
    chained = chain_hooks(
        {"on_starting": lambda s: calls.append("a"), "child_exit": lambda s, w: calls.append("a")},
        {
            "child_exit": lambda s, w: calls.append("b"),
            "nworkers_changed": lambda s, new, old: calls.append(f"b{new}{old}"),
        },
        {"nworkers_changed": lambda s, new, old: calls.append(f"c{new}{old}")},
    )
    chained["on_starting"](None)
    chained["child_exit"](None, None)
    chained["nworkers_changed"](None, 3, 2)
    assert calls == ["a", "a", "b", "b32", "c32"]
    config = Config()
    config.set("child_exit", chained["child_exit"])  # Gunicorn validates the arity
    config.set("on_starting", chained["on_starting"])
    config.set("nworkers_changed", chained["nworkers_changed"])
    assert len(inspect.signature(chained["child_exit"]).parameters) == 2


def _connections_per_worker(server: ServerProcess) -> list[int]:
    assert server.proc is not None
    counts = []
    for worker in psutil.Process(server.proc.pid).children():
        established = [
            conn
            for conn in worker.net_connections("tcp")
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == server.port
        ]
        counts.append(len(established))
    return sorted(counts)


async def _load(server: ServerProcess, connections: int, requests_each: int) -> dict:
    """`connections` users, one keep-alive connection each; httpx reconnects on close."""
    seen: dict = {"statuses": Counter(), "closes": 0}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30)
            )
            for _ in range(connections)
        ]

        async def user(client: httpx.AsyncClient) -> None:
            for _ in range(requests_each):
                response = await client.post(
                    "/v2/models/affine/infer",
                    content=AFFINE,
                    headers={"content-type": "application/json"},
                )
                seen["statuses"][response.status_code] += 1
                seen["closes"] += response.headers.get("connection") == "close"
                assert response.json()["outputs"][0]["data"], response.text  # answered whole
            for _ in range(5):  # hold a connection again, as a pool does
                if response.headers.get("connection") != "close":
                    break
                response = await client.get("/v2/health/live")

        await asyncio.gather(*(user(client) for client in clients))
        seen["split"] = _connections_per_worker(server)  # every user's connection, still open

        def settled(metrics: Scrape) -> bool:
            rebalanced = metrics.value("podserve_connections_rebalanced_total")
            return rebalanced == seen["closes"] and metrics.value("podserve_open_connections") >= 32

        # The users' connections stay open meanwhile; the scrape is one more connection.
        seen["metrics"] = await asyncio.to_thread(_scrape_until, server.url, settled)
    return seen


def _scrape_until(url: str, ready: Callable[[Scrape], bool]) -> Scrape:
    """The first scrape that is `ready`, or the last one after 10 refreshes: each worker
    writes its connection gauges and counts once a second (REFRESH_S), so a fixed 1.5 s wait
    can read a worker's sample from before the load ended on a loaded machine."""
    deadline = time.monotonic() + 10 * REFRESH_S
    while not ready(metrics := scrape(url)) and time.monotonic() < deadline:
        time.sleep(REFRESH_S / 4)
    return metrics


def test_keepalive_connections_even_out_across_workers(model_repo: Path) -> None:
    # Unbalanced, the kernel's hash gives 32 connections a 16/16 split 14% of the time.
    with ServerProcess(model_repo, workers=2) as server:
        seen = asyncio.run(_load(server, 32, 60))
    assert set(seen["statuses"]) == {200}, seen
    assert sum(seen["split"]) == 32 and seen["split"][1] - seen["split"][0] <= 1, seen
    assert seen["closes"] < 32, seen  # only surplus connections were closed, not all
    metrics = seen["metrics"]
    assert metrics.value("podserve_connections_rebalanced_total") == seen["closes"], seen
    assert 32 <= metrics.value("podserve_open_connections") <= 33, seen  # +1: the scrape's


def test_balancing_off_never_closes_a_connection(model_repo: Path) -> None:
    env = {"PODSERVE_BALANCE_CONNECTIONS": "false"}
    with ServerProcess(model_repo, workers=2, env=env) as server:
        seen = asyncio.run(_load(server, 32, 30))
    assert set(seen["statuses"]) == {200} and seen["closes"] == 0, seen
    assert sum(seen["split"]) == 32, seen
    metrics = seen["metrics"]
    assert "podserve_connections_rebalanced_total" in metrics.names, seen
    assert metrics.value("podserve_connections_rebalanced_total") == 0, seen
    assert 32 <= metrics.value("podserve_open_connections") <= 33, seen  # still counted


def test_websocket_upgrades_are_answered_as_before_and_not_left_counted(model_repo: Path) -> None:
    """An upgrade request makes no HTTP cycle and hands the connection to uvicorn's
    WebSocket protocol: the balancer must neither break it nor keep counting it."""
    upgrade = (
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with ServerProcess(model_repo, workers=2) as server:
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(upgrade)
                answer = sock.recv(200)
            assert answer.startswith(b"HTTP/1.1 403"), answer  # no WebSocket route: refused
        # The workers write their connection gauges once a second: a leaked count stays.
        metrics = _scrape_until(server.url, lambda m: m.value("podserve_open_connections") <= 1)
        assert metrics.value("podserve_open_connections") <= 1  # the scrape's own
