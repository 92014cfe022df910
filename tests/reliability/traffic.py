"""Closed-loop load that records every request (time, kind, id, status, worker), in a thread.

For scenarios that must account for each request: which were answered (and must be in the
prediction log), which failed, when, and on which worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import soak


@dataclass
class Sample:
    kind: str
    user: int
    request_id: str | None
    started: float  # time.monotonic()
    seconds: float
    status: int | None  # None: the connection failed
    worker: str | None = None
    error: str | None = None


@dataclass
class RecordedLoad:
    """`users[kind]` connections per request kind, each sending as soon as it is answered."""

    port: int
    makers: dict[str, soak.MakeRequest]
    users: dict[str, int]
    pause_after_failure_s: float = 0.0  # a client's back-off after an error answer
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _user(self, kind: str, user: int) -> None:
        conn = soak.Connection("127.0.0.1", self.port)
        make = self.makers[kind]
        while not self.stop.is_set():
            request, request_id = make()
            started = time.monotonic()
            try:
                reply = await conn.send(request)
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.samples.append(
                    Sample(
                        kind,
                        user,
                        request_id,
                        started,
                        time.monotonic() - started,
                        None,
                        error=type(exc).__name__,
                    )
                )
                await asyncio.sleep(0.01)
                continue
            self.samples.append(
                Sample(
                    kind,
                    user,
                    request_id,
                    started,
                    time.monotonic() - started,
                    reply.status,
                    reply.headers.get("x-podserve-worker"),
                )
            )
            if reply.status != 200 and self.pause_after_failure_s:
                await asyncio.sleep(self.pause_after_failure_s)
        conn.close()

    async def _run(self) -> None:
        await asyncio.gather(
            *(
                self._user(kind, index)
                for kind, count in self.users.items()
                for index in range(count)
            )
        )

    def __enter__(self) -> RecordedLoad:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)

    def select(
        self,
        kind: str | None = None,
        since: float = 0.0,
        until: float = float("inf"),
        where: Callable[[Sample], bool] | None = None,
    ) -> list[Sample]:
        return [
            s
            for s in list(self.samples)
            if (kind is None or s.kind == kind)
            and since <= s.started < until
            and (where is None or where(s))
        ]

    def answered_ids(self) -> set[str]:
        return {s.request_id for s in self.samples if s.status == 200 and s.request_id}


# The `report` fixture (conftest.py): report(scenario, **figures).
Report = Callable[..., None]
