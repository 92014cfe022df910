"""Each worker slot's SO_REUSEPORT socket outlives the workers that serve it.

Gunicorn's `reuse_port` gives every worker a listening socket of its own, which the worker
closes when it exits (a recycle, a crash, a reload). Closing a listener that the kernel still
hashes new connections to loses some of them, whatever podserve does in user space:
- without `net.ipv4.tcp_migrate_req` (the default, also in Kubernetes pods), the connections
  in its accept queue are reset: 9-20 in 15 s of 2 recycling workers;
- with it, those are moved to another listener, but a handshake that completes on another
  CPU during the close still fails: the new socket is cloned from the closing listener after
  close() has marked it shut down, so the kernel sends a FIN at once (an empty reply), or it
  finds the listener closed when it queues the socket and resets it. Traced with perf
  (`tcp_rcv_state_process` -> `tcp_shutdown`, and `inet_csk_complete_hashdance` ->
  `inet_child_forget`): ~1 connection per 100 recycles at ~1,400 new connections/s.

So the Gunicorn master creates the socket of each worker slot (connection_balance.py hands
out the slots) and keeps it open; a worker forked into a slot serves that socket, and its
replacement serves the same one. A socket closes only when its slot is given up (a reload,
TTOU) or the master stops. While a slot's worker is not serving (draining, exited, its
replacement loading models) the other workers accept from the slot's socket too (`Cover`,
every tick of 0.1 s), so its connections wait at most a tick instead of a whole start-up;
the socket stays open throughout, and no connection is lost. So do they while a worker's
event loop has not ticked for PODSERVE_LOOP_STALL_S (a blocking call, a deadlock): its
slot's new connections would otherwise wait for Gunicorn's worker timeout.

Every process holds a copy of each slot's socket that existed when it was forked. A copy
whose slot has been given up must close, or the kernel keeps hashing connections to a socket
no one accepts from: each worker closes such copies at every tick, and also while it is
still loading its models. A slot given up and claimed again in between (TTOU then TTIN,
back-to-back reloads) gets a new socket: the master counts each slot's sockets in shared
memory (`SlotRecords`), and a copy of an older one is closed as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import gunicorn.sock

from podserve import connection_balance
from podserve.connection_balance import FREE, NOT_SERVING

log = logging.getLogger(__name__)

_original_create_sockets = gunicorn.sock.create_sockets
_sockets: dict[int, list[Any]] = {}  # slot -> Gunicorn socket wrappers (master; inherited)
_held_generation: dict[int, int] = {}  # slot -> generation of the socket in _sockets
_master_pid: int | None = None
_forking_slot: int | None = None  # set by pre_fork in the master: the child's slot
TICK_S = 0.1  # a starting worker's check for stale copies, as often as uvicorn's tick


class SlotRecords:
    """Per slot, in shared memory mapped by the master before it forks: how many sockets the
    slot has had (the master writes it), and when its worker's event loop last ran (the
    worker writes it, in ms of the system-wide monotonic clock). One writer per field, and
    an aligned 4-byte store is never seen torn."""

    def __init__(self, slots: int) -> None:
        self._memory = mmap.mmap(-1, 8 * slots)  # MAP_SHARED | MAP_ANONYMOUS, zeroed
        records = memoryview(self._memory).cast("I")
        self._generations, self._beats = records[:slots], records[slots:]

    def generation(self, slot: int) -> int:
        return self._generations[slot]

    def renew(self, slot: int) -> int:
        """Master: the slot gets a new socket; its generation."""
        self._generations[slot] = (self._generations[slot] + 1) & _U32
        return self._generations[slot]

    def beat(self, slot: int) -> None:
        """Worker, on its loop: it runs."""
        self._beats[slot] = _now_ms()

    def silent_s(self, slot: int) -> float:
        """Since the slot's worker last beat (modulo 2**32 ms, ~49 days)."""
        return ((_now_ms() - self._beats[slot]) & _U32) / 1000


_U32 = 0xFFFFFFFF


def _now_ms() -> int:
    return int(time.monotonic() * 1000) & _U32


_records: SlotRecords | None = None


def _slot_sockets(conf: Any, log: Any, fds: list[int] | None = None) -> list[Any]:
    """gunicorn.sock.create_sockets, as Gunicorn calls it in a worker right after the fork:
    the worker's slot's sockets instead of new ones."""
    slot = _forking_slot
    if fds is None and os.getpid() != _master_pid and slot in _sockets:
        return list(_sockets[slot])
    return _original_create_sockets(conf, log, fds)


def _ensure(slot: int, server: Any) -> None:
    if slot not in _sockets:
        # Bound, and listening only if deferred_listen is off: the first worker of the slot
        # listens when its start-up is done, as Gunicorn's own per-worker sockets do.
        wrappers = _original_create_sockets(server.cfg, server.log)
        if _records is not None:
            _held_generation[slot] = _records.renew(slot)
        _sockets[slot] = wrappers  # last: a nested close_stale_slots sees all or nothing


def _close(slot: int) -> None:
    for wrapper in _sockets.pop(slot, []):
        wrapper.close()
    _held_generation.pop(slot, None)


def _stale(slot: int, table: connection_balance.ConnectionTable) -> bool:
    """No worker will serve this copy again: its slot is free, or has a newer socket."""
    if table.count(slot) == FREE:
        return True
    held = _held_generation.get(slot)
    return _records is not None and held is not None and _records.generation(slot) != held


def close_stale_slots() -> None:
    """Master and workers: drop the sockets of slots no worker will serve again."""
    table = connection_balance.table()
    if table is None:
        return
    # list(): one step, which a signal handler cannot interrupt. In the master this runs in
    # Gunicorn's SIGCHLD handler, and another worker's exit may run it again inside this one.
    for slot in [slot for slot in list(_sockets) if _stale(slot, table)]:
        _close(slot)


async def _close_stale_slots_every_tick() -> None:
    while True:
        close_stale_slots()
        await asyncio.sleep(TICK_S)


@contextlib.asynccontextmanager
async def starting() -> AsyncIterator[None]:
    """Worker, around uvicorn's start-up: the models load in a thread, and the copies the
    worker inherited must not outlive their slots meanwhile (a reload frees the old workers'
    slots while the new ones load). Once it serves, Cover.tick takes over."""
    sweep = asyncio.create_task(_close_stale_slots_every_tick())
    try:
        yield
    finally:
        sweep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweep


def close_others(own_slot: int | None) -> None:
    """Worker, when its drain begins: let go of the other slots' sockets it inherited. When
    the pod stops, a socket must close once its workers and the master have let go of it:
    new connections are then refused (and go to another pod) instead of waiting in a queue
    that no one accepts from."""
    for slot in [slot for slot in list(_sockets) if slot != own_slot]:
        _close(slot)


def gunicorn_hooks(workers: int) -> dict[str, Any]:
    """After connection_balance's hooks: its slots are claimed and released first."""

    def on_starting(server: Any) -> None:
        global _master_pid, _records
        if not server.cfg.reuse_port:
            return
        _master_pid = os.getpid()
        table = connection_balance.table()
        _records = SlotRecords(table.slots) if table is not None else None
        gunicorn.sock.create_sockets = _slot_sockets
        for slot in range(workers):  # the first workers inherit each other's sockets
            _ensure(slot, server)
        original_stop = server.stop

        def stop(graceful: bool = True) -> None:
            # Shutting down: the port must close as the workers drain, as without slots.
            for slot in list(_sockets):
                _close(slot)
            original_stop(graceful)

        server.stop = stop

    def pre_fork(server: Any, worker: Any) -> None:
        global _forking_slot
        slot = getattr(worker, "podserve_slot", None)
        if _master_pid is not None and slot is not None:
            _ensure(slot, server)
        _forking_slot = slot

    def child_exit(_server: Any, _worker: Any) -> None:
        close_stale_slots()

    def nworkers_changed(_server: Any, _new: int, _old: int | None) -> None:
        close_stale_slots()

    return {
        "on_starting": on_starting,
        "pre_fork": pre_fork,
        "child_exit": child_exit,
        "nworkers_changed": nworkers_changed,
    }


def _listens(wrapper: Any) -> bool:
    try:
        return bool(wrapper.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


def cover(
    own_slot: int | None,
    protocol_factory: Callable[[], asyncio.Protocol],
    backlog: int,
    stall_s: float = 0.0,
) -> Cover | None:
    """A worker's Cover, once it serves; None outside Gunicorn or without slot sockets."""
    if own_slot is None or own_slot not in _sockets:
        return None
    return Cover(own_slot, protocol_factory, backlog, stall_s)


class Cover:
    """A worker's servers on other slots' sockets while their own workers do not serve:
    starting, draining, exited, or stalled (an event loop silent for `stall_s`, which only
    Gunicorn's worker timeout would end; 0: not watched)."""

    def __init__(
        self,
        own_slot: int,
        protocol_factory: Callable[[], asyncio.Protocol],
        backlog: int,
        stall_s: float = 0.0,
    ) -> None:
        self.own_slot = own_slot
        self.protocol_factory = protocol_factory
        self.backlog = backlog  # listen() again on a listening socket sets its backlog
        self.stall_s = stall_s
        self.servers: dict[int, list[asyncio.AbstractServer]] = {}
        self.stalled: set[int] = set()  # slots covered because their worker stalled
        self.cover_failed: set[int] = set()  # slots not covered for want of a descriptor
        self._beat()  # before the first tick: a fresh worker must not look stalled

    def _beat(self) -> None:
        if _records is not None:
            _records.beat(self.own_slot)

    async def tick(self) -> None:
        table = connection_balance.table()
        if table is None:
            return
        self._beat()
        close_stale_slots()
        counts = {slot: table.count(slot) for slot in list(_sockets) if slot != self.own_slot}
        self._note_stalls({slot for slot, count in counts.items() if self._stalled(slot, count)})
        for slot, count in counts.items():
            wrappers = _sockets.get(slot)
            if wrappers is None:
                continue
            not_serving = count == NOT_SERVING or slot in self.stalled
            needed = not_serving and _listens(wrappers[0])
            if needed and slot not in self.servers:
                await self._cover(slot, wrappers)
            elif not needed:
                self.cover_failed.discard(slot)  # a later failure is a new one: warned again
                if slot in self.servers:
                    self._stop(slot)
        for slot in [slot for slot in self.servers if slot not in _sockets]:
            self._stop(slot)

    def _stalled(self, slot: int, count: int) -> bool:
        """Serving, by the table, but its event loop has been silent for `stall_s`."""
        if count < 0 or self.stall_s <= 0 or _records is None:
            return False
        return _records.silent_s(slot) > self.stall_s

    def _note_stalls(self, stalled: set[int]) -> None:
        """Log each change; the connection balancer leaves stalled workers out of the share."""
        if stalled == self.stalled:
            return
        for slot in sorted(stalled ^ self.stalled):
            log.warning(
                "the worker of slot %d %s",
                slot,
                "has stalled: this worker takes its new connections"
                if slot in stalled
                else "no longer stalls (it runs again, or has exited)",
                extra={"slot": slot, "stall_s": self.stall_s},
            )
        self.stalled = stalled
        connection_balance.set_stalled(frozenset(stalled))

    async def _cover(self, slot: int, wrappers: list[Any]) -> None:
        """Serve the slot's sockets too; tried again next tick if this worker is out of file
        descriptors (EMFILE: a flood of idle connections). Raised, that error ended the tick,
        and with it this worker: the one left serving died because another had."""
        servers: list[asyncio.AbstractServer] = []
        try:
            for wrapper in wrappers:
                servers.append(await self._serve(wrapper))
        except OSError as exc:
            for server in servers:
                server.close()
            if slot not in self.cover_failed:  # once per slot, not every tick
                self.cover_failed.add(slot)
                log.warning(
                    "cannot take the connections of slot %d: %s; retrying every tick",
                    slot,
                    exc,
                    extra={"slot": slot, "error": repr(exc)},
                )
            return
        if slot in self.cover_failed:
            self.cover_failed.discard(slot)
            log.info("takes the connections of slot %d again", slot, extra={"slot": slot})
        self.servers[slot] = servers

    async def _serve(self, wrapper: Any) -> asyncio.AbstractServer:
        # A duplicate: closing this server closes only it, the slot's socket stays open.
        sock = socket.socket(fileno=os.dup(wrapper.fileno()))
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_server(self.protocol_factory, sock=sock, backlog=self.backlog)
        except BaseException:
            sock.close()
            raise

    def _stop(self, slot: int) -> None:
        for server in self.servers.pop(slot):
            server.close()

    def close(self) -> None:
        for slot in list(self.servers):
            self._stop(slot)
