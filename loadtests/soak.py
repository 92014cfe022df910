#!/usr/bin/env python3
"""Soak test: load at ~70% of measured capacity for a bounded time; memory and FDs must stay flat.

    python loadtests/soak.py --duration 600                  # the full 10-minute soak
    python loadtests/soak.py --duration 60 --json-out s.json # the CI version (tests/reliability)

Without --url it starts its own `podserve serve` (Gunicorn, --workers) on a free loopback port
over --model-repository (default ./model_repository, as `make run` builds it). Steps:
1. capacity: a closed loop (--capacity-concurrency connections) for --capacity-s seconds;
2. an open loop at --fraction x capacity over a fixed pool of keep-alive connections for
   --duration seconds: the first --warmup seconds warm the allocator and caches, then the
   RSS (/proc/PID/status VmRSS) and open FDs (/proc/PID/fd) of every worker are sampled
   every --sample-s seconds until the end.
Pass: no failed request (non-200 or connection error), every worker's RSS at the end within
--max-rss-growth of its value at the end of the warm-up, no worker has more FDs at the end
than then, no worker was replaced, and the generator kept up with the target rate.
Prints a JSON summary (also to --json-out); exit status 0 on pass, 1 on fail.

The load generator (raw asyncio HTTP/1.1, ~0.1 ms CPU per request, open and closed loop) is
reused by tests/reliability for the overload scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (request bytes, client request id) for one send.
MakeRequest = Callable[[], tuple[bytes, str | None]]


# --- HTTP/1.1 on raw asyncio streams ---------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def encode(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive connection, one request at a time; reconnects after a failure."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes, timeout_s: float = 30.0) -> Reply:
        try:
            async with asyncio.timeout(timeout_s):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                assert self.reader is not None
                self.writer.write(request)
                return await self._read_reply(self.reader)
        except BaseException:
            self.close()
            raise

    async def _read_reply(self, reader: asyncio.StreamReader) -> Reply:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(int(status_line.split(" ", 2)[1]), headers, body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Outcome:
    """What a load run saw; latencies (seconds) of 200 answers only."""

    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # exception type -> count
    latencies: list[float] = field(default_factory=list)
    shed_latencies: list[float] = field(default_factory=list)
    retry_after: Counter = field(default_factory=Counter)  # on 503s
    workers: Counter = field(default_factory=Counter)  # X-Podserve-Worker of answers
    answered_ids: list[str] = field(default_factory=list)  # request ids answered 200
    failed_ids: list[str] = field(default_factory=list)  # request ids not answered 200
    server_timings: list[str] = field(default_factory=list)  # of 200s, if keep_timings
    keep_timings: bool = False
    sent: int = 0
    late_starts: int = 0  # open loop: sends > 50 ms behind schedule (generator fell behind)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def shed(self) -> int:
        return self.statuses.get(503, 0)

    @property
    def failed(self) -> int:
        """Everything that was not a 200: other statuses and connection errors."""
        return self.sent - self.ok

    def record(
        self, request_id: str | None, reply: Reply | None, error: str | None, seconds: float
    ) -> None:
        if reply is None:
            self.errors[error or "error"] += 1
        else:
            self.statuses[reply.status] += 1
            self.workers[reply.headers.get("x-podserve-worker", "?")] += 1
            if reply.status == 200:
                self.latencies.append(seconds)
                if self.keep_timings:
                    self.server_timings.append(reply.headers.get("server-timing", ""))
            elif reply.status == 503:
                self.shed_latencies.append(seconds)
                self.retry_after[reply.headers.get("retry-after", "")] += 1
        ok = reply is not None and reply.status == 200
        if request_id is not None:
            (self.answered_ids if ok else self.failed_ids).append(request_id)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "shed_503": self.shed,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "elapsed_s": round(self.elapsed_s, 2),
            "ok_per_s": round(self.ok / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "p50_ms": round(percentile(self.latencies, 0.50) * 1000, 2),
            "p99_ms": round(percentile(self.latencies, 0.99) * 1000, 2),
            "late_starts": self.late_starts,
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(conn: Connection, make: MakeRequest, outcome: Outcome) -> None:
    request, request_id = make()
    outcome.sent += 1
    started = time.perf_counter()
    try:
        reply = await conn.send(request)
    except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
        outcome.record(request_id, None, type(exc).__name__, time.perf_counter() - started)
        return
    outcome.record(request_id, reply, None, time.perf_counter() - started)


async def closed_loop(
    host: str,
    port: int,
    make: MakeRequest,
    concurrency: int,
    duration_s: float,
    stop: Callable[[], bool] | None = None,
    outcome: Outcome | None = None,
) -> Outcome:
    """`concurrency` connections, each sending its next request when the last is answered,
    for `duration_s` or until `stop()` says so."""
    outcome = outcome or Outcome()
    started = time.perf_counter()
    deadline = started + duration_s

    async def user() -> None:
        conn = Connection(host, port)
        while time.perf_counter() < deadline and not (stop and stop()):
            await _one(conn, make, outcome)
        conn.close()

    await asyncio.gather(*(user() for _ in range(concurrency)))
    outcome.elapsed_s = time.perf_counter() - started
    return outcome


class ConnectionPool:
    """A fixed set of keep-alive connections (stable FD counts); senders wait for a free one."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.idle: asyncio.Queue[Connection] = asyncio.Queue()
        self.all = [Connection(host, port) for _ in range(size)]
        for conn in self.all:
            self.idle.put_nowait(conn)

    def close(self) -> None:
        for conn in self.all:
            conn.close()


async def open_loop(
    pool: ConnectionPool,
    make: MakeRequest,
    rate: float,
    duration_s: float,
    outcome: Outcome | None = None,
) -> Outcome:
    """Requests at a fixed rate whatever the answers (the load an overload test needs)."""
    outcome = outcome or Outcome()
    started = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    total = int(rate * duration_s)

    async def send() -> None:
        conn = await pool.idle.get()
        try:
            await _one(conn, make, outcome)
        finally:
            pool.idle.put_nowait(conn)

    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.05:
            outcome.late_starts += 1
        task = asyncio.create_task(send())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    outcome.elapsed_s = time.perf_counter() - started
    return outcome


# --- processes --------------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def child_pids(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry))
    return sorted(children)


def sample(pids: list[int]) -> dict[int, dict[str, int]]:
    return {pid: {"rss_kib": rss_kib(pid), "fds": fd_count(pid)} for pid in pids}


# --- requests ---------------------------------------------------------------------------------
TABULAR_ROW = [
    17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053,
    8.589, 153.4, 0.0064, 0.049, 0.054, 0.016, 0.03, 0.0062, 25.38, 17.33, 184.6, 2019.0, 0.1622,
    0.6656, 0.7119, 0.2654, 0.4601, 0.1189,
]  # fmt: skip


def model_body(model: str) -> bytes:
    if model == "tabular":
        tensor = {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": TABULAR_ROW}
    elif model == "text":
        tensor = {
            "name": "text",
            "shape": [2],
            "datatype": "BYTES",
            "data": ["a soak test keeps the server busy", "for a long time"],
        }
    elif model == "affine":
        tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    else:
        raise SystemExit(f"unknown --model {model!r}: tabular, text or affine")
    return json.dumps({"inputs": [tensor]}).encode()


def request_maker(model: str, headers: dict[str, str] | None = None) -> MakeRequest:
    body = model_body(model)
    path = f"/v2/models/{model}/infer"
    base = {"Content-Type": "application/json", **(headers or {})}

    def make() -> tuple[bytes, str | None]:
        request_id = uuid.uuid4().hex
        return encode("POST", path, body, {**base, "X-Request-Id": request_id}), request_id

    return make


# --- the server under test --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(repo: Path, workers: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        "PODSERVE_HOST": "127.0.0.1",
        "PODSERVE_PORT": str(port),
        "PODSERVE_WORKERS": str(workers),
        "PODSERVE_MODEL_REPOSITORY": str(repo),
        "PODSERVE_EXPOSE_WORKER_ID": "true",
    }
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "podserve.cli", "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"podserve exited with {proc.returncode}; see {log_path}")
        if len(child_pids(proc.pid)) >= workers and _ready(port):
            return proc, port
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"podserve not ready in 120 s; see {log_path}")


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(encode("GET", "/v2/health/ready"))
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


# --- the soak ---------------------------------------------------------------------------------
async def soak(args: argparse.Namespace, port: int, master: int | None) -> dict[str, Any]:
    host = "127.0.0.1"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    make = request_maker(args.model, headers)
    capacity = await closed_loop(host, port, make, args.capacity_concurrency, args.capacity_s)
    capacity_rps = capacity.ok / capacity.elapsed_s
    rate = args.fraction * capacity_rps
    pool = ConnectionPool(host, port, args.connections)
    warm = await open_loop(pool, make, rate, args.warmup)
    pids = child_pids(master) if master else []
    samples = [{"t_s": 0.0, "workers": sample(pids)}]
    outcome = Outcome()
    load = asyncio.create_task(open_loop(pool, make, rate, args.duration - args.warmup, outcome))
    started = time.monotonic()
    while not load.done():
        await asyncio.wait({load}, timeout=args.sample_s)
        if not load.done() and pids:
            samples.append({"t_s": round(time.monotonic() - started, 1), "workers": sample(pids)})
    end = sample(pids) if pids else {}
    samples.append({"t_s": round(time.monotonic() - started, 1), "workers": end})
    pool.close()
    replaced = sorted(set(child_pids(master)) ^ set(pids)) if master else []
    return verdict(args, capacity, rate, warm, outcome, samples, replaced)


def verdict(
    args: argparse.Namespace,
    capacity: Outcome,
    rate: float,
    warm: Outcome,
    outcome: Outcome,
    samples: list[dict[str, Any]],
    replaced: list[int],
) -> dict[str, Any]:
    first, last = samples[0]["workers"], samples[-1]["workers"]
    workers = {}
    problems = []
    for pid, before in first.items():
        after = last.get(pid, before)
        growth = after["rss_kib"] / before["rss_kib"] - 1
        workers[str(pid)] = {
            "rss_kib_after_warmup": before["rss_kib"],
            "rss_kib_end": after["rss_kib"],
            "rss_kib_max": max(
                s["workers"][pid]["rss_kib"] for s in samples if pid in s["workers"]
            ),
            "rss_growth_pct": round(100 * growth, 2),
            "fds_after_warmup": before["fds"],
            "fds_end": after["fds"],
        }
        if growth >= args.max_rss_growth:
            problems.append(f"worker {pid} RSS grew {100 * growth:.1f}%")
        if after["fds"] > before["fds"]:
            problems.append(f"worker {pid} FDs {before['fds']} -> {after['fds']}")
    total_failed = warm.failed + outcome.failed
    if total_failed:
        problems.append(f"{total_failed} failed requests")
    if replaced:
        problems.append(f"workers replaced: {replaced}")
    achieved = outcome.sent / outcome.elapsed_s if outcome.elapsed_s else 0.0
    if achieved < 0.9 * rate or outcome.late_starts > 0.01 * max(1, outcome.sent):
        problems.append(f"generator fell behind: {achieved:.0f}/s of {rate:.0f}/s")
    return {
        "model": args.model,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "capacity_rps": round(capacity.ok / capacity.elapsed_s, 1),
        "target_rps": round(rate, 1),
        "warmup": warm.summary(),
        "measured": outcome.summary(),
        "workers": workers,
        "samples": samples,
        "passed": not problems,
        "problems": problems,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, help="default: duration/4, at most 60 s")
    parser.add_argument("--fraction", type=float, default=0.7, help="of measured capacity")
    parser.add_argument("--model", default="tabular", help="tabular, text or affine")
    parser.add_argument("--url", help="an already running podserve (else one is started)")
    parser.add_argument("--pid", type=int, help="with --url: Gunicorn master PID to sample")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--capacity-concurrency", type=int, default=16)
    parser.add_argument("--capacity-s", type=float, default=5.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--api-key", default=os.environ.get("PODSERVE_SOAK_API_KEY"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 4)
    if not 0 < args.warmup < args.duration:
        parser.error("--warmup must be between 0 and --duration")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None
    log_path = Path(tempfile.mkstemp(prefix="podserve-soak-", suffix=".log")[1])
    if args.url:
        host_port = args.url.split("//", 1)[-1].rstrip("/")
        port, master = int(host_port.rsplit(":", 1)[1]), args.pid
    else:
        proc, port = start_server(args.model_repository.resolve(), args.workers, log_path)
        master = proc.pid
    try:
        result = asyncio.run(soak(args, port, master))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()
    result["server_log"] = str(log_path) if proc is not None else None
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
