"""The master's logs when stderr does not take them: Gunicorn's arbiter logs through the same
non-blocking handler as the workers (logs.gunicorn_logconfig_dict). With a plain
StreamHandler, a master whose stderr pipe was full blocked on its "worker was killed" line:
the dead worker was never replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
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
