"""The worker's SIGTERM handler may run inside an earlier run of itself.

Python runs a signal handler between two bytecodes of the main thread, and Gunicorn sends
SIGTERM again on each pass of its loop while a worker it stopped (TTOU, a reload) is still
alive. A handler that takes a lock deadlocks when the second signal lands while the first
run holds it: seen once in tests/test_slot_listeners.py, the worker hung until the master
killed it. The tests replay a nested run at every line the handler executes, as a signal
arriving there would (signal_replay.py).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import pytest
from uvicorn.config import Config

from podserve import lifecycle
from podserve.worker import DrainingServer
from signal_replay import run_with_nested


def _finishes(handler: Callable[[], None], timeout: float = 10) -> tuple[bool, int]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_with_nested(handler, handler)))
    thread.daemon = True  # a deadlocked one must not keep pytest from exiting
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), (result or [0])[0]


@pytest.fixture(autouse=True)
def _not_draining(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "_draining", False)


def test_begin_draining_survives_a_nested_call_at_every_line() -> None:
    done, runs = _finishes(lifecycle.begin_draining)
    assert done, "begin_draining deadlocked when called again inside itself"
    assert runs >= 1 and lifecycle.is_draining()


def test_the_workers_exit_handler_survives_a_nested_signal_at_every_line() -> None:
    server = DrainingServer(Config(app=lambda: None))
    done, runs = _finishes(lambda: server.handle_exit(signal.SIGTERM, None))
    assert done, "handle_exit deadlocked when a second SIGTERM arrived inside it"
    assert runs > 3  # the replay did reach into uvicorn's part of the handler
    assert server.should_exit and lifecycle.is_draining()
