"""The master's logs when stderr does not take them: Gunicorn's arbiter logs through the same
non-blocking handler as the workers (logs.gunicorn_logconfig_dict). With a plain
StreamHandler, a master whose stderr pipe was full blocked on its "worker was killed" line:
the dead worker was never replaced. And a worker forked while the master's writer thread
was blocked in a buffered sys.stderr.write() inherited that stream's lock held, for ever:
its lines never came out once the pipe drained (the handler now writes to the descriptor)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from server_process import PODSERVE, ServerProcess


def _fill(pipe_write_end: int) -> None:
    """Fill the pipe to the last byte, through an open file description of its own: the
    server's stays blocking (O_NONBLOCK is shared by every dup of one description)."""
    fd = os.open(f"/proc/self/fd/{pipe_write_end}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        for size in (4096, 1):  # whole pages, then what a page still has room for
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(fd, b"\n" * size)
    finally:
        os.close(fd)


def test_a_master_whose_stderr_is_full_still_replaces_a_dead_worker(affine_repo: Path) -> None:
    server = ServerProcess(affine_repo, workers=1)
    read_end, write_end = os.pipe()
    server.proc = subprocess.Popen([*PODSERVE, "serve"], env=server.env, stdout=write_end,
                                   stderr=write_end)  # fmt: skip
    try:
        server.wait_ready(90)  # nothing read yet: the start-up's lines fit in the pipe
        _fill(write_end)
        (victim,) = server.worker_pids()
        os.kill(victim, signal.SIGKILL)  # the master logs it, then forks a replacement
        deadline = time.monotonic() + 30
        while server.worker_pids() in ([], [victim]):
            assert time.monotonic() < deadline, "the dead worker was never replaced"
            time.sleep(0.1)
        server.wait_ready(60)
    finally:

        def read_all() -> None:
            while os.read(read_end, 1 << 16):
                pass

        os.close(write_end)  # EOF once the server and its workers are gone
        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        server.stop()
        reader.join(10)
        os.close(read_end)


def _read_into(fd: int, out: bytearray) -> None:
    while chunk := os.read(fd, 1 << 16):
        out += chunk


def _writer_blocked_on_pipe(pid: int) -> bool:
    """A thread of `pid` asleep in a pipe write (the kernel names it pipe_write or
    anon_pipe_write)."""
    tasks = Path(f"/proc/{pid}/task")
    return any("pipe_write" in (task / "wchan").read_text() for task in tasks.iterdir())


def _replacement_of(server: ServerProcess, victim: int) -> int:
    deadline = time.monotonic() + 30
    while not (pids := [pid for pid in server.worker_pids() if pid != victim]):
        assert time.monotonic() < deadline, "the dead worker was never replaced"
        time.sleep(0.1)
    return pids[0]


@contextlib.contextmanager
def _unread_server(repo: Path) -> Iterator[tuple[ServerProcess, int, int]]:
    """A server (one worker) whose stdout and stderr are a pipe the test reads when it likes,
    with sys.stderr buffered as outside the image (no PYTHONUNBUFFERED)."""
    server = ServerProcess(repo, workers=1)
    server.env.pop("PYTHONUNBUFFERED", None)
    read_end, write_end = os.pipe()
    server.proc = subprocess.Popen([*PODSERVE, "serve"], env=server.env, stdout=write_end,
                                   stderr=write_end)  # fmt: skip
    try:
        yield server, read_end, write_end
    finally:
        os.close(write_end)  # EOF once the server and its workers are gone
        reader = threading.Thread(target=_read_into, args=(read_end, bytearray()), daemon=True)
        reader.start()
        server.stop()
        reader.join(10)
        os.close(read_end)


def test_a_worker_forked_while_the_masters_writer_is_blocked_still_logs(
    affine_repo: Path,
) -> None:
    """Measured before the fix: the replacement's "Booting worker" line never came out."""
    with _unread_server(affine_repo) as (server, read_end, write_end):
        server.wait_ready(90)
        _fill(write_end)
        (first,) = server.worker_pids()
        os.kill(first, signal.SIGKILL)  # the master's writer thread blocks on its line
        second = _replacement_of(server, first)
        deadline = time.monotonic() + 30
        while not _writer_blocked_on_pipe(server.proc.pid):
            assert time.monotonic() < deadline, "the master's writer never blocked on the pipe"
            time.sleep(0.05)
        os.kill(second, signal.SIGKILL)  # forked again while that writer is mid-write
        third = _replacement_of(server, second)
        out = bytearray()
        threading.Thread(target=_read_into, args=(read_end, out), daemon=True).start()
        booted = f"Booting worker with pid: {third}".encode()
        deadline = time.monotonic() + 30
        while booted not in out and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [line for line in bytes(out).decode(errors="replace").splitlines() if line]
        assert booted in out, "\n".join(lines[-20:])  # the filler's blank lines left out
        server.wait_ready(60)
