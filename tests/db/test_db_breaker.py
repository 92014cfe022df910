"""The circuit breaker in front of the pool: fail fast while open, one probe at a time."""

from __future__ import annotations

import time

from podserve.db.pool import CircuitBreaker


def test_opens_after_consecutive_failures_and_probes_once() -> None:
    breaker = CircuitBreaker(failures=3, reset_s=0.05)
    for _ in range(2):
        breaker.failure()
        assert breaker.admit()  # still closed
    breaker.failure()
    assert breaker.is_open and not breaker.admit()  # open: fail fast
    time.sleep(0.06)
    assert breaker.admit()  # half-open: one probe goes through ...
    assert not breaker.admit()  # ... and only one
    breaker.failure()  # the probe failed: open again for reset_s
    assert not breaker.admit()
    time.sleep(0.06)
    assert breaker.admit()
    breaker.success()  # the probe succeeded: closed
    assert not breaker.is_open and breaker.admit() and breaker.admit()


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failures=2, reset_s=10)
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert not breaker.is_open


def test_an_inconclusive_probe_lets_the_next_one_through() -> None:
    breaker = CircuitBreaker(failures=1, reset_s=0.01)
    breaker.failure()
    time.sleep(0.02)
    assert breaker.admit()
    breaker.release_probe()  # e.g. the request was cancelled
    assert breaker.admit()
