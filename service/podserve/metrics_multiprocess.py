"""Prometheus multiprocess mode: the per-pod directory of mmap files, and its lifecycle.

Gunicorn's master empties the directory at start and, when a worker exits (recycled or
crashed), folds its files into archive files (:func:`fold_dead_worker`): its counts and
histograms are added to ``counter_archive.db`` / ``histogram_archive.db``, so totals never go
backwards, while the directory holds the live workers' files plus one archive per metric
type, however often workers recycle (each dead worker's files used to stay: ~69 KiB and
~1.3 ms of scrape each, until a size-limited emptyDir filled and new workers died of SIGBUS).
A scrape reads the files between folds (:func:`read_consistent`). The metrics themselves,
and how workers record them, are metrics.py's.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import values
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
PODSERVE_ENV_DIR = "PODSERVE_PROMETHEUS_MULTIPROC_DIR"


# --- the per-pod directory (Gunicorn master) ------------------------------------------------
def multiproc_dir() -> Path | None:
    value = os.environ.get(ENV_DIR)
    return Path(value) if value else None


def prepare_multiproc_dir(configured: Path | None) -> tuple[Path, bool]:
    """Choose, create and empty the directory; export it for prometheus_client in the workers.

    Order: PODSERVE_PROMETHEUS_MULTIPROC_DIR, PROMETHEUS_MULTIPROC_DIR, else a fresh temp dir
    (returned with created=True so the master removes it on exit).
    """
    existing = configured or multiproc_dir()
    try:
        if existing is None:
            path, created = Path(tempfile.mkdtemp(prefix="podserve-metrics-")), True
        else:
            path, created = existing, False
            path.mkdir(parents=True, exist_ok=True)
            # Samples of a previous server (container restart), and what a fold left half done.
            for stale in [*path.glob("*.db"), *path.glob(".*.db.tmp"), path / GENERATION_FILE]:
                stale.unlink(missing_ok=True)
    except OSError as exc:  # in the master, before any worker: one line, not a traceback
        source = PODSERVE_ENV_DIR if configured else ENV_DIR if existing else "TMPDIR"
        problem = f"{source}: cannot create or empty the metrics directory: {exc}"
        log.error("start-up failed", extra={"error": problem})
        raise SystemExit(1) from None
    os.environ[ENV_DIR] = str(path)
    os.environ[PODSERVE_ENV_DIR] = str(path)
    use_multiprocess_values()
    return path, created


_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _cached_pid() -> int:
    """prometheus_client asks for the pid on every inc/observe (a syscall, ~1 us here, ~15
    times per request) to notice a fork; the fork hook above keeps this answer current."""
    return _pid[0]


def use_multiprocess_values() -> None:
    """prometheus_client picks its value class when first imported: fix it if that was early.

    Runs before any metric exists in the process (Gunicorn's master, or the first Metrics()),
    so no sample is ever written through two value classes.
    """
    if multiproc_dir() is None or getattr(values.ValueClass, "_podserve_pid_cache", False):
        return
    values.ValueClass = values.MultiProcessValue(process_identifier=_cached_pid)
    values.ValueClass._podserve_pid_cache = True  # type: ignore[attr-defined]


# The master's: its directory, the fold generation, the pids whose fold failed. Module-level,
# so that hooks built again on a HUP reload keep them (a fresh state lost the failed folds,
# leaked the generation's file and forgot to remove a directory it had created).
_MASTER_STATE: dict[str, Any] = {"unfolded": set()}


def gunicorn_hooks(configured: Path | None) -> dict[str, Callable[..., None]]:
    """Master-side hooks: empty the directory at start, fold a dead worker's files."""
    state = _MASTER_STATE  # not per call: a HUP reload builds the hooks again

    def on_starting(_server: Any) -> None:
        state["path"], state["created"] = prepare_multiproc_dir(configured)

    def child_exit(server: Any, worker: Any) -> None:
        path = state.get("path") or multiproc_dir()
        if path is None:
            return
        generation = state.get("generation")
        if generation is None or generation.path != path:
            if generation is not None:
                generation.close()
            generation = state["generation"] = FoldGeneration(path)
        unfolded: set[int] = state["unfolded"]
        unfolded.add(worker.pid)
        live = getattr(server, "WORKERS", {})
        for pid in sorted(unfolded):
            if pid in live:  # its pid was reused: the files are a live worker's again
                unfolded.discard(pid)
                continue
            try:
                fold_dead_worker(path, pid, generation)
                unfolded.discard(pid)
            except Exception:  # the files stay and are counted; retried at the next exit
                log.exception("could not fold the metric files of worker %s", pid)
                with contextlib.suppress(OSError):
                    mark_process_dead(pid, str(path))

    def on_exit(_server: Any) -> None:
        generation = state.get("generation")
        if generation is not None:
            generation.close()
        if state.get("created"):
            shutil.rmtree(state["path"], ignore_errors=True)

    return {"on_starting": on_starting, "child_exit": child_exit, "on_exit": on_exit}


# --- a dead worker's files, folded into archives (Gunicorn master) -------------------------
# prometheus_client names a file <type>_<pid>.db, a gauge's gauge_<mode>_<pid>.db, and
# MultiProcessCollector reads every *.db, taking the type (and a gauge's mode) from the name:
# counter_archive.db reads as a counter, gauge_max_archive.db as a max gauge of pid "archive".
ARCHIVE_ID = "archive"
GENERATION_FILE = ".podserve-folds"  # not *.db: the collector never reads it
# How a dead worker's samples join the archive, by file prefix. "live*" gauges end with their
# worker (mark_process_dead's rule), and so do "all" gauges: their series are per pid (the
# pid label comes from the file name, so an archive could not keep them apart), and a dead
# worker's would otherwise stay in every scrape forever, which is the pile-up folded here.
FOLD_RULES = {
    "counter": "sum", "histogram": "sum", "summary": "sum",
    "gauge_sum": "sum", "gauge_max": "max", "gauge_min": "min", "gauge_mostrecent": "mostrecent",
    "gauge_all": "drop", "gauge_liveall": "drop", "gauge_livesum": "drop",
    "gauge_livemax": "drop", "gauge_livemin": "drop", "gauge_livemostrecent": "drop",
}  # fmt: skip
_ENTRY_OVERHEAD = 32  # per MmapedDict entry: 4 (key length) + <= 8 (padding) + 16 (value, time)
_MMAP_INITIAL_SIZE = 1 << 16  # prometheus_client.mmap_dict._INITIAL_MMAP_SIZE
# How long a scrape waits for a fold to end: a fold takes milliseconds, but a master paused
# by its pod's CPU quota (up to a 100 ms period) may be caught in the middle of one.
READ_WAIT_S = 2.0


class FoldGeneration:
    """A seqlock between the master's folds and the workers' scrapes.

    A fold replaces an archive and removes the dead worker's file: two steps, and a scrape
    reading in between would count the worker twice (or not at all, or fail on a file gone
    since it listed the directory); Prometheus would take the dip that follows for a counter
    reset. The master makes the number in GENERATION_FILE odd for the fold and even after it;
    a scrape (read_consistent) reads again unless it saw the same even number before and
    after reading the files. The master never waits for a scrape.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._value = 0

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        self._write(self._value + 1)  # raises (nothing changed yet) if it cannot be written
        try:
            yield
        finally:
            self._write(self._value + 1)

    def _write(self, value: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path / GENERATION_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        # 8 bytes in place: after the first write the page exists, so no later write needs
        # space (a full directory cannot leave the number odd).
        os.pwrite(self._fd, struct.pack("<Q", value), 0)
        self._value = value

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_generation(path: Path) -> int:
    try:
        with open(path / GENERATION_FILE, "rb") as file:
            data = file.read(8)
    except FileNotFoundError:
        return 0
    return struct.unpack("<Q", data)[0] if len(data) == 8 else 0


def read_consistent(path: Path) -> Iterable[Metric]:
    """MultiProcessCollector's merge of every file, read while no fold ran (FoldGeneration)."""
    pattern = os.path.join(glob.escape(str(path)), "*.db")
    deadline = time.monotonic() + READ_WAIT_S
    while time.monotonic() < deadline:
        before = read_generation(path)
        if before % 2:  # a fold is running: it takes a millisecond or so
            time.sleep(0.001)
            continue
        try:
            metrics = MultiProcessCollector.merge(glob.glob(pattern), accumulate=True)
        except FileNotFoundError:  # a dead worker's file, folded since the glob
            continue
        if read_generation(path) == before:
            return metrics
    # A master that died in the middle of a fold (its workers follow it): read as it is.
    return MultiProcessCollector.merge(glob.glob(pattern), accumulate=True)


def fold_dead_worker(path: Path, pid: int, generation: FoldGeneration) -> None:
    """Fold the files of exited worker `pid` into the archives and remove them.

    Counters, histograms and summaries are summed per sample, "sum" / "max" / "min" /
    "mostrecent" gauges combined as MultiProcessCollector would, "live*" and "all" gauges
    dropped (FOLD_RULES). Each new archive is written to a temp file first (its space
    reserved, so a full tmpfs fails with ENOSPC rather than SIGBUS in the master), then, with
    the generation odd, put in place with os.replace and the worker's file unlinked. The
    master runs one fold at a time (child_exit); it costs a few milliseconds.
    """
    suffix = f"_{pid}.db"
    replacements: list[tuple[Path, Path, Path]] = []  # (temp file, archive, dead file)
    dropped: list[Path] = []
    try:
        for dead in sorted(path.glob(f"*{suffix}")):
            prefix = dead.name[: -len(suffix)]
            rule = FOLD_RULES.get(prefix)
            if rule is None:
                log.warning("left %s: unknown kind of multiprocess metric file", dead.name)
            elif rule == "drop":
                dropped.append(dead)
            else:
                archive = path / f"{prefix}_{ARCHIVE_ID}.db"
                samples = read_samples(archive)
                fold_samples(rule, samples, read_samples(dead))
                temp = path / f".{archive.name}.tmp"
                replacements.append((temp, archive, dead))
                write_samples(temp, samples)
        if not replacements and not dropped:
            return
        with generation.changing():
            for temp, archive, dead in replacements:
                os.replace(temp, archive)
                dead.unlink(missing_ok=True)
            for dead in dropped:
                dead.unlink(missing_ok=True)
    finally:
        for temp, _, _ in replacements:
            temp.unlink(missing_ok=True)  # left only if the fold failed before its replace


def read_samples(file: Path) -> dict[str, tuple[float, float]]:
    """key -> (value, timestamp) of one multiprocess file ({} if there is none, or if it is
    shorter than its 8-byte header: a worker killed as it created the file, which
    prometheus_client's reader refuses with struct.error)."""
    try:
        if file.stat().st_size < 8:
            return {}
        return {
            key: (value, timestamp)
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(file))
        }
    except FileNotFoundError:
        return {}


def fold_samples(
    rule: str, archive: dict[str, tuple[float, float]], dead: dict[str, tuple[float, float]]
) -> None:
    """Add a dead worker's samples to `archive` (in place) by FOLD_RULES' `rule`."""
    for key, (value, timestamp) in dead.items():
        old = archive.get(key)
        if old is None:
            archive[key] = (value, timestamp)
        elif rule == "sum":
            archive[key] = (old[0] + value, max(old[1], timestamp))
        elif (
            (rule == "max" and value > old[0])
            or (rule == "min" and value < old[0])
            or (rule == "mostrecent" and timestamp > old[1])
        ):
            archive[key] = (value, timestamp)


def write_samples(file: Path, samples: dict[str, tuple[float, float]]) -> None:
    """A new multiprocess file of `samples`, written by prometheus_client's MmapedDict.

    The bytes it will write are allocated first: MmapedDict writes through an mmap, and a
    page that a full tmpfs cannot back raises SIGBUS, which would kill the master. The rest
    of the file (MmapedDict's capacity, 64 KiB or more) stays sparse, as in a worker's file.
    """
    needed = 8 + sum(len(key.encode()) + _ENTRY_OVERHEAD for key in samples)
    size = _MMAP_INITIAL_SIZE
    while size < needed:  # MmapedDict never grows a file that already fits
        size *= 2
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            os.posix_fallocate(fd, 0, needed)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.write(fd, bytes(needed))  # a file system without fallocate: write the zeros
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    mmaped = MmapedDict(str(file))
    try:
        for key, (value, timestamp) in samples.items():
            mmaped.write_value(key, value, timestamp)
    finally:
        mmaped.close()
