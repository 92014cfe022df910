"""The service writes only to its configured directories (read-only root filesystem).

We are root here and cannot remount /, so the check is done two ways at once:
- podserve runs as `nobody` (setpriv, no capabilities) with HOME and the working directory
  on a root-owned, read-only directory: any write outside the writable directories it is
  given (spool, Prometheus multiprocess dir, TMPDIR; as the Helm chart mounts emptyDirs)
  fails and would break start-up or serving;
- strace records every successful file-creating or file-modifying system call of the whole
  process tree (open for writing, mkdir, rename, unlink, link, chmod, bind of a UNIX socket,
  ...): each path must lie under one of those directories. This also catches writes to
  world-writable places (/tmp, /dev/shm) that `nobody` could still do.
The run serves requests, is scraped, logs predictions, loses its database and is stopped, so
the spool is written too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import postgres
import soak
from server_process import PODSERVE, ServerProcess
from tcp_proxy import TcpProxy
from traffic import Report

NOBODY = 65534
WRITE_CALLS = (
    "open,openat,openat2,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,"
    "unlinkat,rmdir,link,linkat,symlink,symlinkat,truncate,chmod,fchmodat,chown,"
    "fchownat,lchown,utimensat,mknod,mknodat,bind"
)
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
HARMLESS = ("/dev/null", "/dev/tty", "/dev/urandom")
TABULAR = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


class TracedServer(ServerProcess):
    """`podserve serve` as nobody, under strace; SIGTERM goes to Gunicorn, not to strace."""

    def __init__(self, repo: Path, env: dict[str, str], cwd: Path, trace: Path) -> None:
        super().__init__(repo, workers=2, env=env)
        self.cwd, self.trace = cwd, trace

    def start(self, timeout: float = 120.0) -> TracedServer:
        # -ff: one output file per process, so no call is split into unfinished/resumed lines
        command = [
            "strace",
            "-f",
            "-ff",
            "-qq",
            "-y",
            "--seccomp-bpf",
            "-e",
            f"trace={WRITE_CALLS}",
            "-o",
            str(self.trace / "trace"),
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
            *PODSERVE,
            "serve",
        ]
        self.proc = subprocess.Popen(
            command, env=self.env, cwd=self.cwd, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def master(self) -> int | None:
        assert self.proc is not None
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        )
        return int(out.stdout.split()[0]) if out.stdout.split() else None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        master = self.master()
        if master is None:
            self.proc.terminate()
        else:
            os.kill(master, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture()
def layout(model_repo: Path) -> Iterator[dict[str, Path]]:
    base = Path(tempfile.mkdtemp(prefix="podserve-rofs-"))
    base.chmod(0o755)
    dirs = {
        "readonly": base / "readonly",
        "models": base / "models",
        "spool": base / "spool",
        "prometheus": base / "prometheus",
        "tmp": base / "tmp",
    }
    shutil.copytree(model_repo, dirs["models"])
    for path in [dirs["models"], *dirs["models"].rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by nobody, owned by root
    dirs["readonly"].mkdir(mode=0o555)
    for name in ("spool", "prometheus", "tmp"):
        dirs[name].mkdir(mode=0o700)
        os.chown(dirs[name], NOBODY, NOBODY)
    try:
        yield dirs
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _uid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])


def write_calls(trace: str) -> list[tuple[str, str]]:
    """(absolute path, result) of every write-type call in `strace -y` output; result is
    "ok" or the errno name (EACCES, EROFS, EEXIST, ...)."""
    calls = []
    for line in trace.splitlines():
        call = re.match(r"(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<[^>]*>)?(?:\s+(\w+))?", line)
        if not call:
            continue
        name, args, result, errno = call.groups()
        outcome = "ok" if int(result) >= 0 else (errno or "error")
        if name.startswith("open") and not any(flag in args for flag in WRITE_FLAGS):
            continue
        if name == "bind":
            calls += [(path, outcome) for path in re.findall(r'sun_path="([^"]+)"', args)]
            continue
        dirfd = re.match(r"(?:\d+|AT_FDCWD)<([^>]*)>,", args)  # openat(7</some/dir>, "name")
        base = dirfd.group(1) if dirfd else ""
        for path in re.findall(r'"((?:[^"\\]|\\.)*)"', args):
            calls.append((path if path.startswith("/") else os.path.join(base, path), outcome))
    return calls


def test_writes_only_to_configured_directories(
    layout: dict[str, Path], rel_db: str, report: Report, tmp_path: Path
) -> None:
    before = sorted(p.name for p in layout["readonly"].iterdir())
    with TcpProxy(*postgres.host_port(rel_db)) as proxy:
        env = postgres.server_env(
            postgres.with_port(rel_db, proxy.port),
            layout["spool"],
            HOME=str(layout["readonly"]),
            TMPDIR=str(layout["tmp"]),
            PYTHONDONTWRITEBYTECODE="1",
            PODSERVE_MODEL_REPOSITORY=str(layout["models"]),
            PODSERVE_PROMETHEUS_MULTIPROC_DIR=str(layout["prometheus"]),
            PROMETHEUS_MULTIPROC_DIR=str(layout["prometheus"]),
            # Rows stay buffered until the stop, when the database is gone: a timed flush
            # between the last request and the cut would leave nothing for the spool.
            PODSERVE_PREDICTION_LOG_FLUSH_MS="60000",
        )
        env.pop("XDG_CACHE_HOME", None)
        (tmp_path / "strace").mkdir()
        server = TracedServer(layout["models"], env, layout["readonly"], tmp_path / "strace")
        try:
            server.start()
            master = server.master()
            assert master is not None
            uids = {_uid(pid) for pid in [master, *soak.child_pids(master)]}
            with httpx.Client(base_url=server.url, timeout=10) as client:
                statuses = [
                    client.post("/v2/models/tabular/infer", json=TABULAR).status_code
                    for _ in range(20)
                ]
                statuses.append(client.get("/metrics").status_code)
            proxy.cut()  # the buffered prediction-log rows can only go to the spool now
            exit_code = server.stop()
        finally:
            server.stop()
    trace = "\n".join(f.read_text() for f in sorted((tmp_path / "strace").iterdir()))
    calls = write_calls(trace)
    allowed = tuple(str(layout[name]) for name in ("spool", "prometheus", "tmp"))

    def outside(wanted: set[str]) -> list[str]:
        return sorted(
            {
                f"{path} ({result})"
                for path, result in calls
                if result in wanted
                and not path.startswith(allowed)
                and not path.startswith(HARMLESS)
            }
        )

    written_outside = outside({"ok"})
    refused_outside = outside({"EACCES", "EROFS", "EPERM"})  # tried, and the FS said no
    spooled = sorted(p.name for p in layout["spool"].iterdir())
    report(
        "readonly_fs",
        write_calls=sum(r == "ok" for _, r in calls),
        written_outside=written_outside,
        refused_outside=refused_outside,
        spool_files=spooled,
        statuses=sorted(set(statuses)),
        exit_code=exit_code,
        uids=sorted(uids),
    )
    assert uids == {NOBODY}, uids
    assert statuses == [200] * 21, server.logs()[-3000:]
    assert exit_code == 0, server.logs()[-3000:]
    assert sum(r == "ok" for _, r in calls) > 10, trace[-2000:]  # the trace saw the writes
    assert written_outside == [], written_outside
    assert refused_outside == [], refused_outside  # nothing even tried (e.g. $HOME/.cache)
    assert any(name.endswith(".seg") for name in spooled), spooled
    assert sorted(p.name for p in layout["readonly"].iterdir()) == before
