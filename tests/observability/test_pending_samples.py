"""Samples tallied per request and flushed in bulk read exactly as if observed one by one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from podserve.metrics import PHASE_BUCKETS, PendingSamples

# On a bucket bound (le is inclusive), between bounds, below the first, above the last.
VALUES = [0.0001, 0.00011, 0.0, 0.003, 0.005, 2.5, 7.0, 0.02, 0.0001, 1e-9]


def _metrics(registry: CollectorRegistry) -> tuple[Histogram, Counter]:
    histogram = Histogram("phase", "h", ["phase"], buckets=PHASE_BUCKETS, registry=registry)
    counter = Counter("requests", "c", ["status"], registry=registry)
    return histogram, counter


def _exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_flushed_tallies_equal_direct_observations() -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    (h_direct, c_direct), (h_tallied, c_tallied) = _metrics(direct), _metrics(tallied)
    pending = PendingSamples()
    for round_values in (VALUES, VALUES[:3]):  # two flushes add up
        for value in round_values:
            h_direct.labels("infer").observe(value)
            c_direct.labels("200").inc()
            pending.observe(h_tallied.labels("infer"), value)
            pending.inc(c_tallied.labels("200"))
        c_direct.labels("503").inc(2)
        pending.inc(c_tallied.labels("503"), 2)
        assert _exposition(tallied) != _exposition(direct)  # nothing written before the flush
        pending.flush()
        assert _exposition(tallied) == _exposition(direct)
    pending.flush()  # an empty flush changes nothing
    assert _exposition(tallied) == _exposition(direct)


def test_children_without_bucket_internals_are_observed_directly() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    child = Plain()
    pending = PendingSamples()
    pending.observe(child, 0.5)
    assert child.seen == [0.5]
