"""Worker slots' sockets kept by the Gunicorn master, and covered while no worker serves them.

The whole-server behaviour is in test_worker_recycle.py (recycles lose nothing, with or
without tcp_migrate_req), test_deferred_listen.py (a replacement's slot is served by the
other worker while it starts) and reliability/test_worker_crash.py; these check the parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gunicorn.sock
import httpx
import pytest
from gunicorn.config import Config

from load_client import AFFINE, closed_loop
from pieces_support import wait_for_metric
from podserve import connection_balance, deferred_listen, slot_listeners
from podserve.connection_balance import FREE, NOT_SERVING, ConnectionTable
from server_process import ServerProcess, free_port
from signal_replay import run_with_nested


@pytest.fixture
def master(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    with _master(monkeypatch) as state:
        yield state


@contextlib.contextmanager
def _master(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A Gunicorn master's state for two workers; module state and patches undone after."""
    monkeypatch.setattr(gunicorn.sock, "create_sockets", gunicorn.sock.create_sockets)
    monkeypatch.setattr(
        gunicorn.sock.BaseSocket,
        "_is_listening",
        gunicorn.sock.BaseSocket.__dict__["_is_listening"],
    )
    monkeypatch.setattr(slot_listeners, "_sockets", {})
    monkeypatch.setattr(slot_listeners, "_held_generation", {})
    monkeypatch.setattr(slot_listeners, "_records", None)
    monkeypatch.setattr(slot_listeners, "_master_pid", None)
    monkeypatch.setattr(slot_listeners, "_forking_slot", None)
    monkeypatch.setattr(connection_balance, "_table", None)
    cfg = Config()
    cfg.set("bind", [f"127.0.0.1:{free_port()}"])
    cfg.set("reuse_port", True)
    stopped: list[bool] = []
    server = SimpleNamespace(
        cfg=cfg,
        log=logging.getLogger("test"),
        stop=lambda graceful=True: stopped.append(graceful),
        WORKERS={},
        num_workers=2,
    )
    deferred_listen.install(server)
    balance, slots = connection_balance.gunicorn_hooks(2), slot_listeners.gunicorn_hooks(2)
    balance["on_starting"](server)
    slots["on_starting"](server)
    try:
        yield SimpleNamespace(server=server, balance=balance, slots=slots, stopped=stopped)
    finally:
        for wrappers in slot_listeners._sockets.values():
            for wrapper in wrappers:
                wrapper.close()


def _fork(master: SimpleNamespace) -> Any:
    worker = SimpleNamespace()
    master.balance["pre_fork"](master.server, worker)
    master.slots["pre_fork"](master.server, worker)
    return worker


def _exit(master: SimpleNamespace, worker: Any) -> None:
    """Gunicorn's child_exit hooks for an exited worker, in gunicorn_conf's order."""
    master.balance["child_exit"](master.server, worker)
    master.slots["child_exit"](master.server, worker)


def _listens(wrapper: Any) -> bool:
    return bool(wrapper.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def test_the_master_binds_each_slots_socket_and_a_worker_gets_its_own(
    master: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    sockets = slot_listeners._sockets
    assert sorted(sockets) == [0, 1]
    ports = {wrappers[0].getsockname()[1] for wrappers in sockets.values()}
    assert ports == {master.server.cfg.address[0][1]}  # one port, SO_REUSEPORT
    assert not any(_listens(wrappers[0]) for wrappers in sockets.values())  # until it serves
    first, second = _fork(master), _fork(master)
    assert (first.podserve_slot, second.podserve_slot) == (0, 1)
    # In the child forked last, Gunicorn asks for "its own" sockets: the slot's.
    monkeypatch.setattr(slot_listeners, "_master_pid", -1)
    got = gunicorn.sock.create_sockets(master.server.cfg, master.server.log)
    assert got == sockets[1]


def test_in_the_master_gunicorn_still_creates_new_sockets(master: SimpleNamespace) -> None:
    _fork(master)
    created = gunicorn.sock.create_sockets(master.server.cfg, master.server.log)
    try:
        assert created != slot_listeners._sockets[0]
    finally:
        for wrapper in created:
            wrapper.close()


def test_an_exited_workers_socket_stays_open_for_its_replacement(master: SimpleNamespace) -> None:
    first, second = _fork(master), _fork(master)
    slot_socket = slot_listeners._sockets[first.podserve_slot][0]
    slot_socket.listen(16)  # as its worker's uvicorn did
    master.server.WORKERS = {2: second}  # the first exited (a recycle): a replacement is due
    _exit(master, first)
    assert slot_listeners._sockets[first.podserve_slot][0] is slot_socket
    with socket.create_connection(slot_socket.getsockname(), timeout=2):
        pass  # queued for whoever serves the slot next: neither refused nor reset
    replacement = _fork(master)
    assert replacement.podserve_slot == first.podserve_slot


def test_a_slot_given_up_closes_its_socket_and_stop_closes_all(master: SimpleNamespace) -> None:
    first, second = _fork(master), _fork(master)
    master.server.num_workers = 1  # TTOU: no replacement comes
    master.server.WORKERS = {2: second}
    _exit(master, first)
    assert sorted(slot_listeners._sockets) == [second.podserve_slot]
    master.server.stop()
    assert slot_listeners._sockets == {}
    assert master.stopped == [True]  # Gunicorn's own stop still runs


def _two_old_workers_exit(at: int) -> int:
    """A reload: two new workers serve, and the two old ones exit; the second one's SIGCHLD
    handler (Gunicorn runs child_exit in it) nested at line `at` of the first one's. Both
    old slots must end free and closed. Returns how many lines the first handler ran."""
    with pytest.MonkeyPatch.context() as monkeypatch, _master(monkeypatch) as master:
        old = [_fork(master), _fork(master)]
        new = [_fork(master), _fork(master)]  # slots 2 and 3
        master.server.WORKERS = {10: new[0], 11: new[1]}  # the old ones: stopped on purpose
        lines = run_with_nested(lambda: _exit(master, old[0]), lambda: _exit(master, old[1]), at)
        if not 0 <= at < lines:
            _exit(master, old[1])  # not nested: after the first one's handler
        table = connection_balance.table()
        assert table is not None
        assert [table.count(w.podserve_slot) for w in old] == [FREE, FREE], at
        assert sorted(slot_listeners._sockets) == sorted(w.podserve_slot for w in new), at
        return lines


def test_two_workers_exiting_at_once_close_their_slots_in_nested_handlers() -> None:
    """Wherever the second exit's handler lands in the first one's, both slots close and
    nothing fails (a dict changed while it was being walked)."""
    lines = _two_old_workers_exit(at=-1)  # no nesting: count the lines
    assert lines > 10
    for at in range(lines):
        _two_old_workers_exit(at)


WorkerCopies = tuple[dict[int, list[Any]], dict[int, int]]


def _copies_at_fork() -> WorkerCopies:
    """The slot sockets as a worker forked now inherits them: its own fds, the same sockets."""
    sockets = {
        slot: [socket.socket(fileno=os.dup(wrapper.fileno())) for wrapper in wrappers]
        for slot, wrappers in slot_listeners._sockets.items()
    }
    return sockets, dict(slot_listeners._held_generation)


@contextlib.contextmanager
def _in_worker(copies: WorkerCopies) -> Iterator[dict[int, list[Any]]]:
    """slot_listeners' state is the worker's for the block (the master's after it)."""
    saved = slot_listeners._sockets, slot_listeners._held_generation
    slot_listeners._sockets, slot_listeners._held_generation = copies
    try:
        yield copies[0]
    finally:
        slot_listeners._sockets, slot_listeners._held_generation = saved
        for wrappers in copies[0].values():
            for wrapper in wrappers:
                wrapper.close()


def test_a_workers_copy_of_a_slot_given_up_and_claimed_again_closes(
    master: SimpleNamespace,
) -> None:
    """TTOU, then TTIN within one tick of the other worker: the slot is FREE again before
    that worker looks, and the master has bound a new socket for it. The worker's copy of
    the old one must close all the same, or it stays in the port's group unserved."""
    first, second = _fork(master), _fork(master)
    copies = _copies_at_fork()  # the second worker's
    old = copies[0][first.podserve_slot][0]
    master.server.num_workers = 1  # TTOU: the first worker stops, its slot is given up
    master.server.WORKERS = {2: second}
    _exit(master, first)
    master.server.num_workers = 2  # TTIN
    again = _fork(master)
    assert again.podserve_slot == first.podserve_slot
    with _in_worker(copies) as sockets:
        slot_listeners.close_stale_slots()
        assert old.fileno() == -1
        assert sorted(sockets) == [second.podserve_slot]  # its own stays
    assert slot_listeners._sockets[first.podserve_slot][0].fileno() != -1  # the master's new one


def test_a_starting_worker_closes_copies_of_slots_given_up_while_its_models_load(
    master: SimpleNamespace,
) -> None:
    """A reload: the new workers are forked while the old ones still serve, and the old
    ones' slots are given up while the new ones load their models (no tick runs yet)."""
    old = [_fork(master), _fork(master)]
    new = [_fork(master), _fork(master)]
    copies = _copies_at_fork()  # the last new worker's
    old_copies = [copies[0][worker.podserve_slot][0] for worker in old]
    master.server.WORKERS = {10: new[0], 11: new[1]}  # the old ones: stopped on purpose
    for worker in old:
        _exit(master, worker)

    async def start_up() -> None:
        async with slot_listeners.starting():
            await asyncio.sleep(2.5 * slot_listeners.TICK_S)  # the models load
            assert [copy.fileno() for copy in old_copies] == [-1, -1]

    with _in_worker(copies) as sockets:
        asyncio.run(start_up())
        assert sorted(sockets) == sorted(worker.podserve_slot for worker in new)


def test_without_reuse_port_nothing_changes(master: SimpleNamespace) -> None:
    for wrappers in slot_listeners._sockets.values():
        for wrapper in wrappers:
            wrapper.close()
    slot_listeners._sockets.clear()
    server = SimpleNamespace(cfg=SimpleNamespace(reuse_port=False))
    slot_listeners.gunicorn_hooks(1)["on_starting"](server)
    assert slot_listeners._sockets == {}
    assert slot_listeners.cover(0, asyncio.Protocol, 16) is None


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"covered")  # type: ignore[attr-defined]
        transport.close()


def test_a_worker_covers_a_slot_only_while_its_own_worker_does_not_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = ConnectionTable(4)
    mine, other = table.claim(), table.claim()
    assert (mine, other) == (0, 1)
    table.publish(mine, 0)
    monkeypatch.setattr(connection_balance, "_table", table)
    listener = socket.create_server(("127.0.0.1", 0))  # the other slot's, listening
    monkeypatch.setattr(slot_listeners, "_sockets", {mine: [], other: [listener]})
    address = listener.getsockname()

    async def scenario() -> None:
        cover = slot_listeners.cover(mine, _Answer, 16)
        assert cover is not None
        await cover.tick()  # the other is NOT_SERVING (starting): covered
        reader, writer = await asyncio.open_connection(*address)
        assert await asyncio.wait_for(reader.read(), 5) == b"covered"
        writer.close()
        table.publish(other, 0)  # it serves now
        await cover.tick()
        assert cover.servers == {}
        assert listener.fileno() != -1 and listener.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        )  # only this worker's duplicate closed
        table.publish(other, NOT_SERVING)  # draining
        await cover.tick()
        assert list(cover.servers) == [other]
        table.release(other)  # given up: the socket closes here too
        await cover.tick()
        assert cover.servers == {} and other not in slot_listeners._sockets
        assert listener.fileno() == -1

    asyncio.run(scenario())


def test_a_worker_covers_a_serving_slot_whose_worker_has_stalled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = ConnectionTable(4)
    mine, other = table.claim(), table.claim()
    table.publish(mine, 0)
    table.publish(other, 3)  # serving, with 3 connections
    records = slot_listeners.SlotRecords(table.slots)
    balancer = connection_balance.ConnectionBalancer(table, mine)
    monkeypatch.setattr(connection_balance, "_table", table)
    monkeypatch.setattr(connection_balance, "_balancer", balancer)
    monkeypatch.setattr(slot_listeners, "_records", records)
    listener = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(slot_listeners, "_sockets", {mine: [], other: [listener]})
    now_ms = [1_000_000]
    monkeypatch.setattr(slot_listeners, "_now_ms", lambda: now_ms[0])

    async def scenario() -> None:
        cover = slot_listeners.cover(mine, _Answer, 16, stall_s=2.0)
        assert cover is not None
        records.beat(other)
        now_ms[0] += 1900
        await cover.tick()
        assert cover.servers == {}  # silent, but not for long enough
        now_ms[0] += 200
        await cover.tick()
        assert list(cover.servers) == [other] and cover.stalled == {other}
        assert balancer.stalled == {other}  # out of its fair share
        assert balancer.stalls_seen == 1
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        assert await asyncio.wait_for(reader.read(), 5) == b"covered"
        writer.close()
        assert records.silent_s(mine) < 0.1  # its own beat: every tick
        records.beat(other)  # it runs again
        await cover.tick()
        assert cover.servers == {} and cover.stalled == set()
        assert balancer.stalled == set()
        now_ms[0] += 2100  # stalls again, and Gunicorn's timeout kills it: its slot is freed
        await cover.tick()
        assert cover.stalled == {other} and balancer.stalls_seen == 2
        table.release(other)
        await cover.tick()
        assert cover.servers == {} and cover.stalled == set() and balancer.stalled == set()
        unwatched = slot_listeners.cover(mine, _Answer, 16, stall_s=0)
        assert unwatched is not None
        now_ms[0] += 60_000
        await unwatched.tick()
        assert unwatched.servers == {}  # PODSERVE_LOOP_STALL_S=0: not watched
        cover.close()
        listener.close()

    asyncio.run(scenario())


def test_a_draining_worker_lets_go_of_the_other_slots_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the pod stops, the master closes its copies; the port must then close as the
    workers drain, not keep queueing connections that no one will accept."""
    own, other = socket.socket(), socket.socket()
    monkeypatch.setattr(slot_listeners, "_sockets", {0: [own], 1: [other]})
    slot_listeners.close_others(0)
    assert other.fileno() == -1 and own.fileno() != -1  # its own: uvicorn closes it
    assert list(slot_listeners._sockets) == [0]
    own.close()


def _slow_infer(url: str, rows: int) -> int:
    body = {
        "inputs": [
            {"name": "x", "shape": [rows, 256], "datatype": "FP32", "data": [0.01] * (rows * 256)}
        ]
    }
    return httpx.post(f"{url}/v2/models/slow/infer", json=body, timeout=60).status_code


def test_when_the_pod_stops_new_connections_are_refused_while_workers_drain(
    model_repo: Path,
) -> None:
    """Every worker inherits every slot's socket; if the draining ones kept them, the port
    would take connections until the last worker exits, and reset them then."""
    # Each request awaits 4 s of simulated I/O: in flight long after the 1 s they are given
    # to reach a worker, however slow the machine (0.3 s of CPU-bound work was not always).
    env = {"PODSERVE_SIMULATED_IO_MS": "4000"}
    with ServerProcess(model_repo, workers=2, env=env) as server:
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(_slow_infer, server.url, 1) for _ in range(4)]
            time.sleep(1.0)  # both workers serving them
            server.signal(signal.SIGTERM)
            refused_while_draining = False
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and not all(f.done() for f in running):
                try:
                    socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                except ConnectionRefusedError:
                    refused_while_draining = not all(f.done() for f in running)
                    break
                except ConnectionResetError:  # queued as a listener closed: try again
                    pass
                time.sleep(0.01)
            statuses = [future.result() for future in running]
        assert statuses == [200] * 4, server.logs()[-3000:]  # in flight: finished
        assert refused_while_draining, "the port still took connections during the drain"


def _answers_for(
    server: ServerProcess, seconds: float, timeout: float = 5, least: int = 0
) -> list[int | str]:
    """New connections one after another, for `seconds` and at least `least` of them:
    statuses, or the error of those not answered."""
    outcomes: list[int | str] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until or len(outcomes) < least:
        try:
            with httpx.Client(timeout=timeout) as client:  # a new connection each time
                outcomes.append(client.get(f"{server.url}/v2/health/live").status_code)
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)
    return outcomes


def _wait_for_workers(server: ServerProcess, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(server.worker_pids()) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.worker_pids()) == count, server.logs()[-3000:]


def test_slots_given_up_and_added_leave_no_socket_without_a_worker(model_repo: Path) -> None:
    """TTOU gives a slot up, TTIN and a reload (HUP) add new ones: no connection may be
    queued on a socket that no worker will serve (it would hang until its timeout)."""
    with ServerProcess(model_repo, workers=2) as server:
        for sig, workers in [(signal.SIGTTOU, 1), (signal.SIGTTIN, 2), (signal.SIGHUP, 2)]:
            before = set(server.worker_pids())
            server.signal(sig)
            if sig == signal.SIGHUP:  # new workers replace all the old ones
                deadline = time.monotonic() + 30
                while set(server.worker_pids()) & before and time.monotonic() < deadline:
                    time.sleep(0.05)
            _wait_for_workers(server, workers)
            time.sleep(1.5)  # the new workers' start-up
            outcomes = _answers_for(server, 2)
            assert len(outcomes) > 20 and set(outcomes) == {200}, (sig, outcomes)


def _wait_reaped(pid: int, timeout: float = 30) -> None:
    """Until the master has reaped the worker (its child_exit hooks run right after)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.0005)
    assert not Path(f"/proc/{pid}").exists(), f"worker {pid} still there after {timeout} s"


def test_a_slot_given_up_and_claimed_again_at_once_leaves_no_stale_socket(
    model_repo: Path,
) -> None:
    """TTOU, then TTIN as soon as the worker has gone: the new worker claims the freed slot,
    and the master binds a new socket for it, all within a tick of the other worker. That
    worker must let go of the old socket it inherited; kept, the old socket stays in the
    port's group and the connections hashed to it are never accepted."""
    with ServerProcess(model_repo, workers=2) as server:
        for _ in range(3):
            _wait_for_workers(server, 2)
            time.sleep(1.5)  # both serve
            oldest = min(server.worker_pids())
            server.signal(signal.SIGTTOU)  # Gunicorn stops its oldest worker
            _wait_reaped(oldest)
            server.signal(signal.SIGTTIN)
            _wait_for_workers(server, 2)
            time.sleep(1.5)  # the new worker's start-up
            outcomes = _answers_for(server, 2, timeout=2)
            assert len(outcomes) > 20 and set(outcomes) == {200}, outcomes


def test_the_other_workers_take_a_stalled_workers_new_connections(model_repo: Path) -> None:
    """A worker whose event loop does not run (SIGSTOP here; a blocking call or a deadlock
    in production) keeps its slot's socket in the port's group until Gunicorn's worker
    timeout kills it: the connections hashed to it would hang that long. Once it has been
    silent for PODSERVE_LOOP_STALL_S, the other worker accepts from its slot's socket too,
    and lets go when it runs again."""
    env = {"PODSERVE_LOOP_STALL_S": "0.5"}
    with ServerProcess(model_repo, workers=2, env=env) as server:
        _wait_for_workers(server, 2)
        stalled = max(server.worker_pids())
        server_workers = set(server.worker_pids())
        seen = len(server.logs())
        os.kill(stalled, signal.SIGSTOP)
        try:
            # Silent for longer than the stall limit, and seen so by the other worker (a
            # fixed 1 s was not always enough on a loaded machine).
            _wait_for_log(server, "has stalled", seen)
            # Enough connections that some hash to the stalled slot (a loaded machine made
            # fewer than 20 in 2 s)
            outcomes = _answers_for(server, 2, timeout=2, least=21)
            kept_alive = asyncio.run(
                closed_loop(server.url, "/v2/models/affine/infer", AFFINE, 8, 1.0, 5000)
            )
        finally:
            os.kill(stalled, signal.SIGCONT)
        assert set(outcomes) == {200}, outcomes
        # Alone in the connection balancer's share: it keeps the connections it took over.
        assert set(kept_alive.statuses) == {200} and not kept_alive.errors, kept_alive.errors
        assert kept_alive.closed_by_server == 0, kept_alive.closed_by_server
        _wait_for_log(server, "no longer stalls", seen)  # it runs again: the cover ends
        assert set(server.worker_pids()) == server_workers  # not replaced: it was only slow
        answered_by = _workers_answering(server, 2)
        assert len(answered_by) == 2, answered_by  # both take new connections again
        # Each worker writes its counters every second (a fixed 1.1 s could miss the write)
        assert wait_for_metric(server.url, "podserve_worker_stalls_seen_total", 1, 30) == 1


def _wait_for_log(server: ServerProcess, text: str, start: int, timeout: float = 30) -> None:
    """Until `text` is in the server's log past its first `start` characters."""
    logs = server.wait_for_logs(lambda logs: text in logs[start:], timeout)
    assert text in logs[start:], f"no {text!r} within {timeout} s: {logs[-3000:]}"


def _workers_answering(server: ServerProcess, seconds: float) -> set[str]:
    workers: set[str] = set()
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        with httpx.Client(timeout=5) as client:  # a new connection each time
            response = client.get(f"{server.url}/v2/health/live")
            assert response.status_code == 200
            workers.add(response.headers["x-podserve-worker"])
    return workers
