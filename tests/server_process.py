"""Start and stop a real `podserve serve` (Gunicorn + UvicornWorkers) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

PODSERVE = [sys.executable, "-m", "podserve.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_to_exit(repo: Path, env: dict[str, str], timeout: float = 60.0) -> tuple[int, str]:
    """Exit status and output of a `podserve serve` that must stop by itself (a start-up error).

    It runs in its own session: one that does not stop is killed with its workers, and the
    test fails, instead of leaving orphaned workers behind.
    """
    proc = subprocess.Popen(
        [*PODSERVE, "serve"],
        env={
            **os.environ,
            "PODSERVE_MODEL_REPOSITORY": str(repo),
            "PODSERVE_PORT": str(free_port()),
            "PODSERVE_WORKERS": "1",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"podserve serve did not stop by itself:\n{output[-3000:]}") from None
    return proc.returncode, output


class ServerProcess:
    def __init__(self, repo: Path, workers: int = 2, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="podserve-", suffix=".log", delete=False
        )
        self.env = {
            **os.environ,
            "PODSERVE_HOST": "127.0.0.1",
            "PODSERVE_PORT": str(self.port),
            "PODSERVE_WORKERS": str(workers),
            "PODSERVE_MODEL_REPOSITORY": str(repo),
            "PODSERVE_EXPOSE_WORKER_ID": "true",
            "PODSERVE_GRACEFUL_TIMEOUT_S": "10",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # a server that never got ready must not outlive the test
            raise
        return self

    def launch(self) -> None:
        """Start the server without waiting for it (the caller stops it)."""
        self.proc = subprocess.Popen(
            [*PODSERVE, "serve"], env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float) -> None:
        """Ready once every worker has answered /v2/health/ready with 200."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"podserve exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                response = httpx.get(f"{self.url}/v2/health/ready", timeout=2)
                if response.status_code == 200:
                    seen.add(response.headers.get("x-podserve-worker", "?"))
                    if len(seen) >= self.workers:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"podserve not ready after {timeout}s (saw {seen}):\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def wait_for_logs(self, ready: Callable[[str], bool], timeout: float = 15.0) -> str:
        """The logs once `ready` says so, or as they are at the deadline (the caller asserts):
        a worker writes a request's line after its answer, later still on a loaded machine."""
        deadline = time.monotonic() + timeout
        while not ready(logs := self.logs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return logs

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in out.stdout.split()]

    def replace_worker(self, victim: int, timeout: float = 60) -> None:
        """SIGKILL worker `victim` (a crash, an OOM kill); back once its replacement serves."""
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = set(self.worker_pids())
            if victim not in pids and len(pids) == self.workers:
                break
            time.sleep(0.1)
        self.wait_ready(timeout)

    def client_per_worker(self) -> list[httpx.Client]:
        """One keep-alive client connected to each worker (the caller closes them)."""
        clients: dict[str, httpx.Client] = {}
        deadline = time.monotonic() + 20
        while len(clients) < self.workers and time.monotonic() < deadline:
            http = httpx.Client(base_url=self.url, timeout=10)
            worker = http.get("/v2/health/live").headers["x-podserve-worker"]
            if worker in clients:
                http.close()
            else:
                clients[worker] = http
        assert len(clients) == self.workers, f"reached workers {sorted(clients)}"
        return list(clients.values())

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
