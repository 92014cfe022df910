"""CPU per request of the ASGI app stack alone: podserve vs a bare FastAPI constant endpoint.

No sockets, no HTTP parser, no load generator: the app is called in-process with prebuilt
ASGI messages by `--concurrency` concurrent callers on uvloop, and process CPU time (event
loop and inference thread together) is divided by the request count, and so is the event
loop's own (the main thread's) CPU time. This isolates what podserve's own code costs per
request (routing, parsing, validation, the thread hop to the inference pool, encoding,
metrics) from what every uvicorn server pays, and it is far less noisy than an HTTP
benchmark on a shared machine. To compare two versions of the code, `--against` measures
podserve from another checkout's `service/` directory too, in alternating fresh processes.

    .venv/bin/python -m loadtests.bench_app_cpu                 # tabular demo model
    .venv/bin/python -m loadtests.bench_app_cpu --requests 50000 --rounds 5
    .venv/bin/python -m loadtests.bench_app_cpu --rounds 8 --against /tmp/old/service
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loadtests.bench_systems import tabular_body

PATH = "/v2/models/tabular/infer"


def _scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": PATH, "raw_path": PATH.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {},
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip


async def _call(app: Any, body: bytes, statuses: Counter) -> None:
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a client that stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] += 1

    await app(_scope(body), receive, send)


Measured = tuple[float, float, Counter]  # process CPU, event-loop CPU (s per request), statuses


async def _cpu_per_request(app: Any, requests: int, concurrency: int) -> Measured:
    body, statuses = tabular_body(), Counter()

    async def caller(n: int) -> None:
        for _ in range(n):
            await _call(app, body, statuses)

    await asyncio.gather(*(caller(50) for _ in range(concurrency)))  # warm-up
    statuses.clear()
    per_caller = max(1, requests // concurrency)
    started, loop_started = time.process_time(), time.thread_time()  # the loop: this thread
    await asyncio.gather(*(caller(per_caller) for _ in range(concurrency)))
    count = per_caller * concurrency
    return (
        (time.process_time() - started) / count,
        (time.thread_time() - loop_started) / count,
        statuses,
    )


async def _measure(kind: str, requests: int, concurrency: int) -> Measured:
    if kind == "constant":
        from loadtests.reference.constant_app import app

        return await _cpu_per_request(app, requests, concurrency)
    from podserve.app import create_app

    app = create_app()
    async with app.router.lifespan_context(app):
        return await _cpu_per_request(app, requests, concurrency)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--against", type=Path, help="another checkout's service/ dir: its podserve is measured too"
    )
    parser.add_argument("--kind", choices=["podserve", "constant"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind:  # one measurement, in a fresh process (see below)
        import uvloop

        cpu, loop_cpu, statuses = uvloop.run(_measure(args.kind, args.requests, args.concurrency))
        print(f"{cpu * 1e6:.1f} {loop_cpu * 1e6:.1f} {dict(statuses)}")
        return 0 if set(statuses) == {200} else 1
    return _compare(args)


def _compare(args: argparse.Namespace) -> int:
    """Alternate fresh processes (podserve, constant, ...) so drift hits both alike."""
    import subprocess

    from podserve.demo_models import build_tabular

    # label -> (kind, PYTHONPATH prefix for that process)
    systems = {"podserve": ("podserve", ""), "constant": ("constant", "")}
    if args.against:
        systems["against"] = ("podserve", str(args.against.resolve()))
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in systems}
    with tempfile.TemporaryDirectory() as tmp:
        models, prom = Path(tmp, "models"), Path(tmp, "prometheus")
        models.mkdir()
        prom.mkdir()
        build_tabular(models)
        env = {**os.environ, "PODSERVE_MODEL_REPOSITORY": str(models),
               "PODSERVE_LOG_LEVEL": "warning", "PODSERVE_TRACING_ENABLED": "false",
               "PODSERVE_SPOOL_DIR": f"{tmp}/spool",
               "PROMETHEUS_MULTIPROC_DIR": str(prom)}  # fmt: skip
        for _ in range(args.rounds):
            for label, (kind, path) in systems.items():
                paths = [path, os.getcwd(), os.environ.get("PYTHONPATH", "")]
                out = subprocess.run(
                    [sys.executable, "-m", "loadtests.bench_app_cpu", "--kind", kind,
                     "--requests", str(args.requests), "--concurrency", str(args.concurrency)],
                    env={**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p)},
                    capture_output=True, text=True, timeout=600, check=False,
                )  # fmt: skip
                if out.returncode != 0:
                    print(out.stdout, out.stderr, file=sys.stderr)
                    return 1
                cpu, loop_cpu = (float(v) for v in out.stdout.split()[:2])
                results[label].append((cpu, loop_cpu))
                print(f"{label:<9} {cpu:7.1f} us CPU per request, {loop_cpu:7.1f} us of it in "
                      "the event loop", flush=True)  # fmt: skip
    (pod, pod_loop), (const, const_loop) = (
        tuple(statistics.median(column) for column in zip(*results[k], strict=True))
        for k in ("podserve", "constant")
    )
    print(f"median: podserve {pod:.1f} us (loop {pod_loop:.1f}), bare FastAPI constant "
          f"{const:.1f} us (loop {const_loop:.1f}), ratio {pod / const:.2f}x")  # fmt: skip
    if args.against:
        against = results["against"]
        old, old_loop = (statistics.median(column) for column in zip(*against, strict=True))
        print(f"median: podserve from {args.against}: {old:.1f} us (loop {old_loop:.1f}); "
              f"this checkout {pod:.1f} us = {pod / old:.3f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
