"""A/B/C: inference threads at normal priority, at nice +10, under SCHED_IDLE, side by side.

2-worker podserve servers in turn (nice 0; nice 10; SCHED_IDLE, the default), the slow
test model (ms of CPU per row) behind a 5 ms awaited I/O step, a closed loop of 32 keep-alive
connections for a bounded time, 127.0.0.1 only. Prints req/s, the I/O-phase (`features`)
p50/p99 from Server-Timing, and the client p99, per round.

    .venv/bin/python -m loadtests.bench_thread_priority --rounds 2 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import orjson

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from load_client import closed_loop, percentile  # noqa: E402
from model_builders import build_test_repository  # noqa: E402
from podserve.phases import parse_server_timing  # noqa: E402
from server_process import ServerProcess  # noqa: E402

BODY = orjson.dumps(
    {"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32", "data": [0.01] * 512}]}
)


VARIANTS = {
    "nice 0": {"PODSERVE_INFERENCE_THREAD_NICE": "0", "PODSERVE_INFERENCE_THREAD_IDLE": "false"},
    "nice 10": {"PODSERVE_INFERENCE_THREAD_NICE": "10", "PODSERVE_INFERENCE_THREAD_IDLE": "false"},
    "SCHED_IDLE": {"PODSERVE_INFERENCE_THREAD_IDLE": "true"},
}


def measure(repo: Path, variant: str, seconds: float) -> str:
    env = {**VARIANTS[variant], "PODSERVE_SIMULATED_IO_MS": "5"}
    with ServerProcess(repo, workers=2, env=env) as server:
        asyncio.run(closed_loop(server.url, "/v2/models/slow/infer", BODY, 32, 2.0))  # warm-up
        result = asyncio.run(closed_loop(server.url, "/v2/models/slow/infer", BODY, 32, seconds))
    io_ms = [parse_server_timing(t).get("features", 0.0) for t in result.server_timings]
    return (
        f"{variant:<10} req/s={result.statuses[200] / seconds:.0f} "
        f"io_p50={percentile(io_ms, 0.5):.2f}ms io_p99={percentile(io_ms, 0.99):.2f}ms "
        f"client_p99={percentile(result.latencies, 0.99) * 1000:.0f}ms errors={len(result.errors)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_test_repository(Path(tmp))
        for _ in range(args.rounds):
            for variant in VARIANTS:
                print(measure(repo, variant, args.seconds), flush=True)


if __name__ == "__main__":
    main()
