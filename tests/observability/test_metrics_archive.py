"""A dead worker's metric files are folded into archives: the directory stays bounded while
workers recycle, and no count is lost or goes backwards (metrics_multiprocess.fold_dead_worker).

Before, every recycled or crashed worker left its counter, histogram and max-gauge files
(~69 KiB) for good: scrapes slowed by ~1.3 ms per dead worker, and the chart's 64 MiB
in-memory emptyDir filled after ~950 recycles, after which new workers died of SIGBUS.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, values
from prometheus_client.multiprocess import MultiProcessCollector

from metrics_support import scrape
from podserve import metrics_multiprocess
from podserve.metrics_multiprocess import (
    ARCHIVE_ID,
    FOLD_RULES,
    FoldGeneration,
    fold_dead_worker,
    fold_samples,
    read_consistent,
    read_samples,
    write_samples,
)
from server_process import ServerProcess

INFER = "/v2/models/{model_name}/infer"
AFFINE = orjson.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)
GAUGE_MODES = sorted(prefix.removeprefix("gauge_") for prefix in FOLD_RULES if "gauge_" in prefix)
PID_FILE = re.compile(r"^(?P<prefix>.+)_(?P<pid>[^_]+)\.db$")


# --- the fold, on files written by prometheus_client ---------------------------------------
def _write_worker(path: Path, pid: int, scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files a worker with this pid would leave: a counter, a histogram, a summary and a
    gauge of every multiprocess mode (values scaled by `scale`, so workers differ)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    value_class = values.MultiProcessValue(process_identifier=lambda: pid)
    monkeypatch.setattr(values, "ValueClass", value_class)
    registry = CollectorRegistry()
    counter = Counter("jobs", "jobs", ["kind"], registry=registry)
    counter.labels("a").inc(3 * scale)
    counter.labels("b").inc(scale)
    histogram = Histogram("latency", "latency", buckets=(1, 2, 4), registry=registry)
    summary = Summary("size", "size", registry=registry)
    for observed in (0.5, 1.5, 3 * scale):
        histogram.observe(observed)
        summary.observe(observed)
    for mode in GAUGE_MODES:
        gauge = Gauge(f"g_{mode}", mode, ["kind"], registry=registry, multiprocess_mode=mode)
        gauge.labels("a").set(10 * scale)
        gauge.labels("b").set(-scale)
    value_class.close_all_files()  # the worker is gone: its files are final


def _samples(files: list[Path]) -> dict[tuple, float]:
    """(name, labels) -> value of the stock MultiProcessCollector's merge of `files`."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in MultiProcessCollector.merge([str(f) for f in files])
        for s in metric.samples
    }


def _by_pid(samples: dict[tuple, float], keep: Callable[[str], bool]) -> dict[tuple, float]:
    return {k: v for k, v in samples.items() if keep(k[0])}


def _folded(name: str) -> bool:
    """Samples whose dead workers' values the fold keeps (all but "live*" and "all" gauges)."""
    return not name.startswith(("g_live", "g_all"))


def test_folding_keeps_every_total_and_drops_only_dead_live_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mostrecent: the gauges written last win, so the later worker's (pid 2) values count
    for pid, scale in ((1, 1.0), (2, 2.0), (3, 0.5)):
        _write_worker(tmp_path, pid, scale, monkeypatch)
        time.sleep(0.01)
    before = _samples(sorted(tmp_path.glob("*.db")))
    live_only = _samples(sorted(tmp_path.glob("*_3.db")))
    assert before[("g_max", (("kind", "a"),))] == 20.0
    assert before[("g_min", (("kind", "b"),))] == -2.0

    generation = FoldGeneration(tmp_path)
    fold_dead_worker(tmp_path, 1, generation)
    fold_dead_worker(tmp_path, 2, generation)  # into the archives the first fold wrote

    names = {f.name for f in tmp_path.glob("*.db")}
    archives = {f"{p}_{ARCHIVE_ID}.db" for p, rule in FOLD_RULES.items() if rule != "drop"}
    assert names == archives | {f"{p}_3.db" for p in FOLD_RULES}, names
    assert not list(tmp_path.glob(".*.tmp"))
    after = _samples(sorted(tmp_path.glob("*.db")))
    # Counters, histograms and sum/max/min/mostrecent gauges: the same pod totals.
    assert _by_pid(after, _folded) == _by_pid(before, _folded)
    assert after[("jobs_total", (("kind", "a"),))] == 3 * (1 + 2 + 0.5)
    assert after[("latency_count", ())] == 9
    assert after[("size_sum", ())] == 3 * 2 + 3 * (1 + 2 + 0.5)
    assert after[("g_sum", (("kind", "a"),))] == 10 * (1 + 2 + 0.5)
    assert after[("g_mostrecent", (("kind", "a"),))] == 5.0  # pid 3 wrote last
    # "live*" and "all" gauges: only the live worker's series are left.
    dropped = _by_pid(after, lambda name: not _folded(name))
    assert dropped == _by_pid(live_only, lambda name: not _folded(name))
    assert all(labels[-1] == ("pid", "3") for (name, labels) in dropped if "all" in name)
    assert generation._value == 4  # two folds, each odd while it ran, even after
    generation.close()


def test_a_worker_killed_as_it_created_its_file_folds_without_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty file (the master's halt SIGTERMed a booting worker right after it created
    it) holds no samples: the fold removes it. It raised struct.error, logged as a
    traceback on a start-up failure that must be one line."""
    _write_worker(tmp_path, 1, 1.0, monkeypatch)
    (tmp_path / "counter_2.db").touch()
    generation = FoldGeneration(tmp_path)
    fold_dead_worker(tmp_path, 2, generation)
    assert not (tmp_path / "counter_2.db").exists()
    assert generation._value == 2
    generation.close()


def test_a_fold_with_nothing_to_fold_leaves_the_directory_alone(tmp_path: Path) -> None:
    generation = FoldGeneration(tmp_path)
    fold_dead_worker(tmp_path, 12345, generation)
    assert list(tmp_path.iterdir()) == []


def test_a_scrape_during_a_fold_counts_the_dead_worker_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mid-fold the new archive and the dead worker's file both exist (the worker counted
    twice): a scrape waits for the even generation instead of reporting that."""
    _write_worker(tmp_path, 1, 1.0, monkeypatch)
    _write_worker(tmp_path, 2, 1.0, monkeypatch)
    total = _samples(sorted(tmp_path.glob("*.db")))[("jobs_total", (("kind", "a"),))]
    generation = FoldGeneration(tmp_path)
    fold_dead_worker(tmp_path, 1, generation)
    seen: list[float] = []
    with generation.changing():  # fold_dead_worker's steps, with a scrape in between
        archive, dead = tmp_path / "counter_archive.db", tmp_path / "counter_2.db"
        samples = read_samples(archive)
        fold_samples("sum", samples, read_samples(dead))
        write_samples(tmp_path / ".new.tmp", samples)
        (tmp_path / ".new.tmp").replace(archive)
        reader = threading.Thread(
            target=lambda: seen.extend(
                s.value
                for metric in read_consistent(tmp_path)
                for s in metric.samples
                if s.name == "jobs_total" and s.labels == {"kind": "a"}
            )
        )
        reader.start()
        time.sleep(0.05)  # the scrape is waiting on the odd generation
        assert seen == []
        dead.unlink()
    reader.join(5)
    assert seen == [total]


def test_hooks_built_again_on_a_hup_keep_the_masters_state(tmp_path: Path) -> None:
    """A HUP reload builds the hooks again: a fresh state forgot the directory it had made
    (never removed at exit), the fold generation's file, and the pids whose fold failed.
    In a process of its own: the hooks switch prometheus_client to multiprocess mode."""
    code = """
import os, sys, tempfile
tempfile.tempdir = sys.argv[1]
from podserve.metrics_multiprocess import gunicorn_hooks
first = gunicorn_hooks(None)
first["on_starting"](None)
made = os.environ["PROMETHEUS_MULTIPROC_DIR"]
again = gunicorn_hooks(None)  # as after a HUP
again["on_exit"](None)
print(os.path.exists(made))
"""
    env = {k: v for k, v in os.environ.items() if "MULTIPROC" not in k}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    )  # fmt: skip
    assert out.stdout.strip() == "False", out.stderr  # the directory made at start is gone


def test_a_fold_that_fails_leaves_the_counts_and_is_retried_at_the_next_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full directory: the temp archive cannot be allocated (ENOSPC, not SIGBUS in the
    master). The dead worker's counts stay in its files, its live gauges go as before."""
    for pid in (1, 2, 3):
        _write_worker(tmp_path, pid, 1.0, monkeypatch)
    totals = _by_pid(_samples(sorted(tmp_path.glob("*.db"))), _folded)
    hooks = metrics_multiprocess.gunicorn_hooks(tmp_path)
    child_exit = hooks["child_exit"]  # the directory from the environment (no on_starting)

    def no_space(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as full:
        full.setattr(os, "posix_fallocate", no_space)
        child_exit(SimpleNamespace(WORKERS={}), SimpleNamespace(pid=1))
        child_exit(SimpleNamespace(WORKERS={}), SimpleNamespace(pid=3))
    assert "could not fold the metric files of worker 1" in caplog.text
    assert (tmp_path / "counter_1.db").exists() and not (tmp_path / "gauge_livesum_1.db").exists()
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*_archive.db"))
    assert _by_pid(_samples(sorted(tmp_path.glob("*.db"))), _folded) == totals

    # Worker 2 exits with room again: worker 1's files are folded too, not those of pid 3,
    # reused meanwhile by a live worker (which carries on with the files it found).
    child_exit(SimpleNamespace(WORKERS={3: object()}), SimpleNamespace(pid=2))
    assert _pids_with_files(tmp_path) == {"3"}
    assert _by_pid(_samples(sorted(tmp_path.glob("*.db"))), _folded) == totals
    child_exit(SimpleNamespace(WORKERS={}), SimpleNamespace(pid=3))
    assert _pids_with_files(tmp_path) == set()
    assert _by_pid(_samples(sorted(tmp_path.glob("*.db"))), _folded) == totals
    hooks["on_exit"](None)


# --- a real server whose workers recycle -------------------------------------------------
@pytest.fixture()
def recycling(affine_repo: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    metrics_dir = tmp_path / "metrics"
    env = {
        "PODSERVE_PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PODSERVE_TRACING_ENABLED": "false",
        "PODSERVE_MAX_REQUESTS": "15",  # + jitter of up to 1 (scrapes and probes count too)
    }
    with ServerProcess(affine_repo, workers=2, env=env) as server:
        yield server, metrics_dir


def _pids_with_files(metrics_dir: Path) -> set[str]:
    pids = set()
    for file in metrics_dir.glob("*.db"):
        match = PID_FILE.match(file.name)
        assert match, file.name
        pids.add(match["pid"])
    return pids - {ARCHIVE_ID}


def _served(url: str) -> tuple[float, float]:
    result = scrape(url)
    labels = {"model": "affine", "route": INFER, "status": "200"}
    return (
        result.value("podserve_requests_total", **labels),
        result.value("podserve_request_duration_seconds_count", **labels),
    )


def test_recycled_workers_leave_no_files_and_lose_no_count(
    recycling: tuple[ServerProcess, Path],
) -> None:
    server, metrics_dir = recycling
    sent, workers_seen, most_pids = 0, set(), 0
    history: list[tuple[float, float]] = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline or len(workers_seen) < 2 + 6:
        assert time.monotonic() < deadline + 30, f"only {len(workers_seen)} workers served"
        for _ in range(10):  # a connection per request: the kernel spreads them
            response = httpx.post(
                f"{server.url}/v2/models/affine/infer",
                content=AFFINE,
                headers={"content-type": "application/json", "connection": "close"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            workers_seen.add(response.headers["x-podserve-worker"])
            sent += 1
        history.append(_served(server.url))
        # The live workers, those exiting and their replacements (workers recycle one at a
        # time, unless one waited PODSERVE_RECYCLE_MAX_WAIT_S); never the dead ones, which
        # before piled up, one more per recycle.
        most_pids = max(most_pids, len(_pids_with_files(metrics_dir)))
        assert most_pids <= 4, sorted(metrics_dir.glob("*.db"))
    for earlier, later in itertools.pairwise(history):
        assert later[0] >= earlier[0] and later[1] >= earlier[1], history

    # Every worker flushes within a second (REFRESH_S) and once more when it exits.
    settle = time.monotonic() + 10
    while _served(server.url) != (sent, sent):
        assert time.monotonic() < settle, (_served(server.url), sent)
        time.sleep(0.2)
    assert len(workers_seen) >= 2 + 6, workers_seen  # at least 6 recycles
    # Left: the live workers' files and the archives.
    while _pids_with_files(metrics_dir) != {str(pid) for pid in server.worker_pids()}:
        assert time.monotonic() < settle, (sorted(metrics_dir.glob("*.db")), server.worker_pids())
        time.sleep(0.2)
    archives = {f.name for f in metrics_dir.glob(f"*_{ARCHIVE_ID}.db")}
    assert archives == {"counter_archive.db", "histogram_archive.db", "gauge_max_archive.db"}
    assert "could not fold" not in server.logs()


def test_module_constants_match_prometheus_client() -> None:
    """write_samples sizes files as MmapedDict does; every gauge mode has a fold rule."""
    from prometheus_client import mmap_dict

    assert metrics_multiprocess._MMAP_INITIAL_SIZE == mmap_dict._INITIAL_MMAP_SIZE
    assert {f"gauge_{mode}" for mode in Gauge._MULTIPROC_MODES} <= set(FOLD_RULES)
