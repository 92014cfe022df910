"""CPU per hand-off of work from the event loop to an inference thread and back.

Compares `loop.run_in_executor` on a 1-thread ThreadPoolExecutor with podserve's own
InferencePool (a SimpleQueue in, one call_soon_threadsafe out), on uvloop, with a no-op
function: what the hop itself costs per batch. Rounds alternate the two.

    .venv/bin/python -m loadtests.bench_thread_handoff --hops 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import uvloop

from podserve.inference_pool import InferencePool


def _noop(value: int) -> int:
    return value


async def _executor_hops(hops: int) -> float:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as executor:
        await loop.run_in_executor(executor, _noop, 0)  # thread started
        started = time.process_time()
        for i in range(hops):
            await loop.run_in_executor(executor, _noop, i)
        return (time.process_time() - started) / hops


async def _pool_hops(hops: int) -> float:
    pool = InferencePool(1)
    try:
        await pool.run_in_slot(_noop, 0)  # thread started
        started = time.process_time()
        for i in range(hops):
            await pool.run_in_slot(_noop, i)
        return (time.process_time() - started) / hops
    finally:
        pool.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"run_in_executor": [], "InferencePool": []}
    for _ in range(args.rounds):
        results["run_in_executor"].append(uvloop.run(_executor_hops(args.hops)))
        results["InferencePool"].append(uvloop.run(_pool_hops(args.hops)))
    for name, values in results.items():
        print(f"{name:<16} {statistics.median(values) * 1e6:6.1f} us CPU per hop "
              f"(rounds: {', '.join(f'{v * 1e6:.1f}' for v in values)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
