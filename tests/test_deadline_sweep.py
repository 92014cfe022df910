"""One sweep per loop instead of a timer per request: header and body read deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.requests import Request

from podserve.deadline_sweep import DeadlineSweep
from podserve.errors import RequestTimeout
from podserve.http_body import read_body


def test_only_deadlines_still_armed_fire_and_the_sweep_stops_when_idle() -> None:
    async def scenario() -> tuple[dict[str, float], bool]:
        loop = asyncio.get_running_loop()
        sweep = DeadlineSweep(loop, 0.2)
        fired: dict[str, float] = {}
        started = time.monotonic()
        for key in ("slow", "done"):
            sweep.arm(key, lambda key=key: fired.__setitem__(key, time.monotonic() - started))
        sweep.disarm("done")  # its headers or body arrived in time
        await asyncio.sleep(0.5)
        return fired, sweep._sweep_handle is None

    fired, idle = asyncio.run(scenario())
    assert set(fired) == {"slow"}
    assert 0.2 <= fired["slow"] < 0.2 + 0.02 + 0.1  # within a tenth of the timeout (+ slack)
    assert idle  # nothing armed: no timer left behind


def _request(receive: object) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    return Request(scope, receive)  # type: ignore[arg-type]


def test_a_body_that_never_arrives_gets_a_timeout() -> None:
    async def never() -> dict:
        await asyncio.Event().wait()
        return {}

    async def scenario() -> float:
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await read_body(_request(never), 1024, 0.2)
        return time.monotonic() - started

    assert 0.2 <= asyncio.run(scenario()) < 0.5


def test_a_cancel_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    async def never() -> dict:
        await asyncio.Event().wait()
        return {}

    async def scenario() -> None:
        reader = asyncio.ensure_future(read_body(_request(never), 1024, 30))
        await asyncio.sleep(0.05)
        reader.cancel()  # e.g. the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await reader

    asyncio.run(scenario())


def test_a_body_in_time_is_read_whole() -> None:
    parts = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    ]

    async def receive() -> dict:
        await asyncio.sleep(0.01)
        return parts.pop(0)

    assert asyncio.run(read_body(_request(receive), 1024, 0.2)) == b"abcd"


def test_a_raising_callback_neither_stops_the_sweep_nor_the_deadlines_beside_it() -> None:
    """One on_expiry that raises (a bug) is logged; the deadlines expiring with it still fire,
    and later ones too (the sweep is rescheduled): the guard stays on for the worker's life."""

    async def scenario() -> tuple[list[str], list[str]]:
        loop = asyncio.get_running_loop()
        unhandled: list[str] = []
        loop.set_exception_handler(lambda _loop, ctx: unhandled.append(str(ctx.get("message"))))
        sweep = DeadlineSweep(loop, 0.05)
        fired: list[str] = []

        def boom() -> None:
            raise RuntimeError("callback bug")

        sweep.arm("a", boom)
        sweep.arm("b", lambda: fired.append("b"))  # expires in the same sweep, after "a"
        await asyncio.sleep(0.2)
        sweep.arm("c", lambda: fired.append("c"))  # armed after the failure
        await asyncio.sleep(0.2)
        return fired, unhandled

    fired, unhandled = asyncio.run(scenario())
    assert fired == ["b", "c"]
    assert unhandled == []  # caught and logged by the sweep, not left to the loop
