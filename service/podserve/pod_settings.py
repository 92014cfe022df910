"""Settings changed at run time for the whole pod, not just the worker a request reached.

`POST /v2/logging` or `/v2/trace/setting` lands on one worker. Each such setting keeps a few
words in anonymous shared memory that the Gunicorn master maps before it forks (as the
connection table), so every worker shares them; a worker applies a change at once and the
others look twice a second. A worker started later (a recycle, a crash) takes the pod's
current values, not the environment's. Without the master (the app run in-process) the
words are the process's own.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
from collections.abc import Callable
from typing import Any

from podserve.errors import BadRequest

log = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 0.5


class SharedWords:
    """[generation, field...] as 32-bit ints, inherited across fork.

    Writers hold a record lock on a memory file, so two changes in two workers never
    interleave; the generation is stored last, so a reader that sees it move reads the
    fields written before it.
    """

    def __init__(self, name: str, fields: int) -> None:
        self._memory = mmap.mmap(-1, 4 * (fields + 1))  # MAP_SHARED | MAP_ANONYMOUS
        self._words = memoryview(self._memory).cast("i")
        self._lock = os.memfd_create(f"podserve-{name}-lock")

    def read(self) -> tuple[int, tuple[int, ...]]:
        return self._words[0], tuple(self._words[1:])

    def write(self, values: tuple[int, ...]) -> int:
        return self.update(lambda _old: values)[0]

    def update(
        self,
        change: Callable[[tuple[int, ...]], tuple[int, ...]],
        initial: tuple[int, ...] | None = None,
    ) -> tuple[int, tuple[int, ...]]:
        """Fields := change(fields), under the lock (a read-modify-write no other process
        interleaves); the new generation and the fields it replaced. `initial`: the fields
        to start from while nothing was ever written (the words hold zeros until then)."""
        fcntl.lockf(self._lock, fcntl.LOCK_EX)
        try:
            old = tuple(self._words[1:])
            if initial is not None and self._words[0] == 0:
                old = initial
            values = change(old)
            if len(values) != len(old):
                raise ValueError(f"{len(values)} values for {len(old)} fields")
            for index, value in enumerate(values, start=1):
                self._words[index] = value
            self._words[0] += 1
            return self._words[0], old
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)


class PodSetting:
    """One setting's shared words, and what this process last applied of them."""

    def __init__(self, name: str, fields: int, apply: Callable[[tuple[int, ...]], None]) -> None:
        self.name, self.fields, self._apply = name, fields, apply
        self._shared: SharedWords | None = None
        self.applied_generation = 0

    @property
    def shared(self) -> SharedWords:
        if self._shared is None:
            self._shared = SharedWords(self.name, self.fields)
        return self._shared

    def publish(self, values: tuple[int, ...]) -> None:
        """Apply here at once, then the other workers follow."""
        self._apply(values)
        self.applied_generation = self.shared.write(values)

    def edit(
        self,
        change: Callable[[tuple[int, ...]], tuple[int, ...]],
        initial: tuple[int, ...] | None = None,
    ) -> None:
        """Fields := change(fields) under the lock (no other worker's change in between, as
        a publish of whole values could overwrite: a change names some fields, and another
        worker may have changed others within the last follow interval), then applied here
        at once. `initial`: the start-up fields, while no change was ever made."""
        self.shared.update(change, initial)
        self.follow()

    def follow(self) -> None:
        generation, values = self.shared.read()
        if generation != self.applied_generation:
            try:
                self._apply(values)
            finally:  # a change this worker cannot apply is not retried (and logged) each look
                self.applied_generation = generation


_SETTINGS: list[PodSetting] = []


def request_fields(request: Any, known: tuple[str, ...], what: str) -> dict[str, Any]:
    """A change's JSON body as a dict of known fields, or BadRequest saying what is wrong."""
    if not isinstance(request, dict):
        raise BadRequest(f"{what} must be a JSON object")
    unknown = sorted(set(request) - set(known))
    if unknown:
        raise BadRequest(f"unknown {what} {unknown}; known: {list(known)}")
    return request


def register(name: str, fields: int, apply: Callable[[tuple[int, ...]], None]) -> PodSetting:
    setting = PodSetting(name, fields, apply)
    _SETTINGS.append(setting)
    return setting


def follow_all() -> None:
    """Each setting's change, one failing to apply (logged with its name) not keeping this
    worker from following it, or the others, later."""
    for setting in _SETTINGS:
        try:
            setting.follow()
        except Exception:
            log.exception(
                "cannot apply a pod setting changed on another worker; still following",
                extra={"setting": setting.name},
            )


class Follower:
    """The worker's follow task, started and stopped with the app's lifespan; its first look
    is at once, so a new worker starts with the pod's values."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow_forever(), name="pod-settings")

    async def stop(self) -> None:
        """Never raises the loop's failure (it was logged): the shutdown steps after it
        (the prediction log's flush, the jobs' requeue) must run."""
        if self._task is not None:
            self._task.cancel()
            current = asyncio.current_task()
            # A caller already cancelled (cleaning up in its `finally`) counts as cancelling
            # for good: only a cancellation that arrives during this wait is the caller's own.
            before = current.cancelling() if current is not None else 0
            try:
                await self._task
            except asyncio.CancelledError:
                if current is not None and current.cancelling() > before:
                    raise  # the caller itself is being cancelled: it must see that
            except Exception:
                log.exception("the pod-settings follower had failed")

    @staticmethod
    async def _follow_forever() -> None:
        while True:
            try:
                follow_all()
            except Exception:  # follow_all logs a setting's failure; anything else here too
                log.exception("pod-settings follower: a look failed; still following")
            await asyncio.sleep(FOLLOW_INTERVAL_S)


def gunicorn_hooks(*settings: PodSetting) -> dict[str, Any]:
    """on_starting: the master maps the settings' words, so each worker it forks shares them."""

    def on_starting(_server: Any) -> None:
        for setting in settings:
            _ = setting.shared

    return {"on_starting": on_starting}
