"""PhaseTimings: durations always, wall-clock times only when trace spans need them."""

from __future__ import annotations

import time

from podserve.phases import PhaseTimings, parse_server_timing


def test_durations_add_up_and_the_header_lists_phases_in_phase_order() -> None:
    timings = PhaseTimings(wall_clock=False)
    timings.record("infer", 0.002)
    timings.record("parse", 0.0001)
    timings.record("parse", 0.0002)  # a phase entered twice counts its total
    with timings.measure("postprocess"):
        time.sleep(0.001)
    header = timings.server_timing()
    assert header.startswith("parse;dur=0.300, infer;dur=2.000, postprocess;dur=")
    assert parse_server_timing(header)["postprocess"] >= 1.0
    assert timings.started_ns == {} and timings.ended_ns == {}  # no clock read for spans


def test_wall_clock_spans_keep_the_first_start_and_the_last_end() -> None:
    timings = PhaseTimings(wall_clock=True)
    timings.record("parse", 0.000_001, start_ns=1_000)
    timings.record("parse", 0.000_002, start_ns=10_000)
    assert timings.started_ns == {"parse": 1_000}
    assert timings.ended_ns == {"parse": 12_000}
    before = time.time_ns()
    with timings.measure("infer"):
        pass
    assert before <= timings.started_ns["infer"] <= timings.ended_ns["infer"] <= time.time_ns()
