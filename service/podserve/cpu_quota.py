"""How many CPUs this pod may use: the cgroup quota, not the node's core count."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_v2_path(proc_cgroup: Path) -> str:
    """The process's cgroup v2 path ("0::/kubepods/..."), or "/" when unknown."""
    for line in (_read(proc_cgroup) or "").splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return "/"


def cgroup_v2_quota(root: Path, proc_cgroup: Path) -> float | None:
    """cpu.max is "<quota> <period>" or "max <period>"; look in our own cgroup, then the root."""
    own = _own_cgroup_v2_path(proc_cgroup).lstrip("/")
    for directory in (root / own, root):
        text = _read(directory / "cpu.max")
        if text is None:
            continue
        quota, _, period = text.partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    return None


def cgroup_v1_quota(root: Path) -> float | None:
    """cpu.cfs_quota_us is -1 when unlimited; the controller dir name varies by distro."""
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota = _read(root / name / "cpu.cfs_quota_us")
        period = _read(root / name / "cpu.cfs_period_us")
        if quota is None or period is None:
            continue
        if int(quota) <= 0:
            return None
        return int(quota) / int(period)
    return None


def affinity_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float:
    """CPUs available: cgroup v2, then v1, then CPU affinity, then os.cpu_count()."""
    for quota in (cgroup_v2_quota(root, proc_cgroup), cgroup_v1_quota(root)):
        if quota is not None and quota > 0:
            return quota
    return float(affinity_cpus() or os.cpu_count() or 1)


def default_workers(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """One worker per CPU of quota, rounded up (1.5 CPUs -> 2), at least 1."""
    return max(1, math.ceil(cpu_limit(root, proc_cgroup) - 1e-9))


def intra_op_threads(workers: int, pool_threads: int, quota: float | None = None) -> int:
    """Threads per ORT session so that workers x pool threads x intra-op <= quota."""
    available = quota if quota is not None else cpu_limit()
    return max(1, math.floor(available / (workers * pool_threads) + 1e-9))
