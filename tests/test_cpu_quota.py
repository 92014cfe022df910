"""Worker and thread sizing from fake cgroup files (v2, v1, none)."""

from __future__ import annotations

from pathlib import Path

import pytest

from podserve import cpu_quota


def _proc_cgroup(tmp_path: Path, line: str = "0::/") -> Path:
    path = tmp_path / "proc_cgroup"
    path.write_text(line + "\n")
    return path


def test_cgroup_v2_quota_rounds_up(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    proc = _proc_cgroup(tmp_path)
    assert cpu_quota.cpu_limit(tmp_path, proc) == pytest.approx(1.5)
    assert cpu_quota.default_workers(tmp_path, proc) == 2


def test_cgroup_v2_nested_path_wins(tmp_path: Path) -> None:
    nested = tmp_path / "kubepods" / "pod1"
    nested.mkdir(parents=True)
    (nested / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    proc = _proc_cgroup(tmp_path, "0::/kubepods/pod1")
    assert cpu_quota.default_workers(tmp_path, proc) == 3


def test_cgroup_v2_unlimited_falls_back_to_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    expected = cpu_quota.affinity_cpus()
    assert cpu_quota.cpu_limit(tmp_path, _proc_cgroup(tmp_path)) == expected


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    controller = tmp_path / "cpu,cpuacct"
    controller.mkdir()
    (controller / "cpu.cfs_quota_us").write_text("250000\n")
    (controller / "cpu.cfs_period_us").write_text("100000\n")
    proc = _proc_cgroup(tmp_path, "")
    assert cpu_quota.cpu_limit(tmp_path, proc) == pytest.approx(2.5)
    assert cpu_quota.default_workers(tmp_path, proc) == 3


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    controller = tmp_path / "cpu"
    controller.mkdir()
    (controller / "cpu.cfs_quota_us").write_text("-1\n")
    (controller / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota.cgroup_v1_quota(tmp_path) is None


def test_small_quota_still_one_worker(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("20000 100000\n")
    assert cpu_quota.default_workers(tmp_path, _proc_cgroup(tmp_path)) == 1


@pytest.mark.parametrize(
    ("workers", "pool", "quota", "expected"),
    [(2, 1, 2.0, 1), (1, 1, 4.0, 4), (2, 1, 4.0, 2), (4, 2, 2.0, 1), (1, 2, 4.0, 2)],
)
def test_intra_op_threads_never_exceed_quota(
    workers: int, pool: int, quota: float, expected: int
) -> None:
    threads = cpu_quota.intra_op_threads(workers, pool, quota)
    assert threads == expected
    assert workers * pool * threads <= max(quota, workers * pool)


def test_gunicorn_config_follows_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from podserve.gunicorn_conf import config_dict
    from podserve.settings import Settings

    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    config = config_dict(Settings(workers=3, port=9001, host="::", graceful_timeout_s=12.5))
    assert config["workers"] == 3
    assert config["bind"] == ["[::]:9001"]
    assert config["graceful_timeout"] == 13
    # The worker's own drain ends 2 s before Gunicorn's SIGKILL.
    assert Settings(graceful_timeout_s=12.5).worker_drain_s == 13 - 2
    assert config["worker_class"] == "podserve.worker.PodserveWorker"
    assert config["reuse_port"] is True  # a socket per worker: an even spread
    assert config_dict(Settings(workers=1))["reuse_port"] is False  # the master's, kept alive
    assert config["keepalive"] > 60  # outlives typical load-balancer idle timeouts


def test_web_concurrency_used_when_workers_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from podserve.runtime import resolve_workers
    from podserve.settings import Settings

    monkeypatch.setenv("WEB_CONCURRENCY", "5")
    assert resolve_workers(Settings()) == 5
    assert resolve_workers(Settings(workers=2)) == 2
