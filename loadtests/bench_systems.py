"""The systems under test: how each server starts, what it is sent, how its CPU is read.

Every system runs under Gunicorn with the same worker count and per-worker SO_REUSEPORT
sockets (so connections spread evenly: findings 1), one ORT intra-op thread per worker, the
same model file and the same request bytes. Servers run in their own process group so that a
process pool's children are stopped with them (findings 3: orphans kept the port).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "The quick brown fox jumps over the lazy dog."  # 12 tokens with [CLS]/[SEP]
TABULAR_ROW = [
    17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871,
    1.095, 0.9053, 8.589, 153.4, 0.0064, 0.049, 0.054, 0.016, 0.03, 0.0062,
    25.38, 17.33, 184.6, 2019.0, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189,
]  # fmt: skip


def exit_on_sigterm() -> None:
    """SIGTERM (`kill`, a CI job's timeout) ends a run as Ctrl-C does, so the context managers
    and `finally` blocks stop its servers: they run in their own process groups and would
    otherwise outlive it, holding ports and cores."""
    signal.signal(signal.SIGTERM, _exit_for_signal)


_received_signal: int | None = None


def _exit_for_signal(signum: int, _frame: object) -> None:
    global _received_signal
    _received_signal = signum
    raise SystemExit(128 + signum)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Exit with main()'s status, or 128 + the signal after SIGTERM.

    The SystemExit is raised wherever the signal lands. If that is inside the event loop's
    own set-up (uvloop installing its signal wake-up), closing the loop fails next, and the
    process would exit 1 with a RuntimeError, although the `finally` blocks still stopped
    the servers.
    """
    try:
        code = main()
    except BaseException:
        if _received_signal is not None:
            raise SystemExit(128 + _received_signal) from None
        raise
    raise SystemExit(code)


def text_body(sentence: str = SENTENCE) -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [sentence]}]}
    )


def tabular_body() -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": TABULAR_ROW}]}
    )


def entity_body(entity: str) -> bytes:
    return orjson.dumps({"parameters": {"entity_ids": [entity]}})  # no inputs: fetched by id


def entity_bodies(count: int = 64) -> list[bytes]:
    """One entity per client (patient-0000 ...), as many clients looking up different rows."""
    return [entity_body(f"patient-{i:04d}") for i in range(count)]


@dataclass
class System:
    """One server configuration and the request it is measured with."""

    name: str
    group: str  # the table it belongs to: minilm, tabular, pg, competitors
    argv: list[str]
    env: dict[str, str]
    path: str
    body: bytes
    note: str = ""
    io_phase: str | None = "features"  # the phase that holds the awaited I/O step
    port: int = 0
    extra_pids: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)  # one per connection (mod); else `body`


_HANDED_OUT: set[int] = set()
# Below Linux's default ephemeral range (32768-60999): the load generator's own outgoing
# connections take ports from that range and once took one picked for a server that had
# not bound it yet (MLServer's metrics port: "address already in use").
_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A loopback port that is free now and was not handed out before in this process."""
    for _ in range(1000):
        port = random.randrange(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_PORT_RANGE}")


def gunicorn_argv(python: str, app: str, workers: int, port: int) -> list[str]:
    """Stock Gunicorn + UvicornWorker, with reuse_port like podserve's own configuration."""
    return [
        python, "-m", "gunicorn", app,
        "--workers", str(workers),
        "--worker-class", "uvicorn_worker.UvicornWorker",
        "--bind", f"127.0.0.1:{port}",
        "--reuse-port",
        "--keep-alive", "75",
        "--graceful-timeout", "5",
        "--log-level", "warning",
    ]  # fmt: skip


class Server:
    """A running system: started in its own session, CPU read over its whole process tree."""

    def __init__(self, system: System, log_dir: Path) -> None:
        self.system = system
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for post-mortems
            dir=log_dir, prefix=f"{system.name}-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._procs: dict[int, psutil.Process] = {}

    def start(self, timeout_s: float = 180.0) -> Server:
        env = {**os.environ, **self.system.env}
        self.proc = subprocess.Popen(
            self.system.argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Ready when the measured request itself answers 200 a few times in a row."""
        deadline = time.monotonic() + timeout_s
        ok = 0
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.system.name} exited:\n{self.logs()[-3000:]}")
            ok = ok + 1 if self.probe() == 200 else 0
            if ok >= 4:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.system.name} not ready in {timeout_s}s:\n{self.logs()[-3000:]}")

    def probe(self) -> int | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.system.port, timeout=10)
            conn.request(
                "POST", self.system.path, self.system.body, {"Content-Type": "application/json"}
            )
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            return None

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and all its descendants (pool children too)."""
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        for proc in tree:  # keep Process objects: cpu_times of the same pid stay comparable
            self._procs.setdefault(proc.pid, proc)
        total = 0.0
        for proc in self._procs.values():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return total

    def loop_thread_seconds(self) -> float:
        """User + system CPU of the workers' main threads (the event loops), so far.

        Workers are the server's direct children (Gunicorn's); a worker's main thread has
        the process id as its thread id. Everything else (inference threads, process-pool
        children, the master) is the rest of cpu_seconds().
        """
        assert self.proc is not None
        total = 0.0
        try:
            workers = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return 0.0
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                for thread in worker.threads():
                    if thread.id == worker.pid:
                        total += thread.user_time + thread.system_time
        return total

    @property
    def is_podserve(self) -> bool:
        return self.system.argv[-2:] == ["podserve.cli", "serve"]

    def batch_totals(self) -> tuple[float, float] | None:
        """(rows, session runs) so far from podserve's /metrics; None for other systems."""
        if not self.is_podserve:
            return None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.system.port, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
        except OSError:
            return None
        totals = {"_sum": 0.0, "_count": 0.0}
        for line in text.splitlines():
            name, _, value = line.partition("{")
            for suffix in totals:
                if name == f"podserve_batch_size{suffix}":
                    totals[suffix] += float(value.rsplit(" ", 1)[1])
        return totals["_sum"], totals["_count"]

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # a pool child left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
