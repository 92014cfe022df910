"""One pod, one repository: a worker refuses models that changed on disk since the pod started.

Each worker loads the repository itself (ORT sessions are made after fork), so a worker
started later (a recycle, a crash, an OOM kill) read whatever was on disk then: a file
edited in place, or a ConfigMap the kubelet updated, left the workers of one pod answering
the same request with different versions. The master takes the repository's fingerprint
when it starts (and on a HUP reload, which replaces every worker); a worker whose loaded
repository no longer matches it fails to boot, and Gunicorn stops the pod, which restarts
with one repository for all its workers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from podserve.model_repository import ModelLoadError

_at_start: str | None = None  # set in the master; forked workers inherit it


def fingerprint(root: Path) -> str:
    """Every visible file's path, size and mtime (symlinks followed: a ConfigMap update
    swaps them for new files), hashed. Hidden entries (`..data`) are reached through the
    links. Not inode numbers: FUSE volumes (GCS, S3 mounts) may hand out new ones for the
    same file after the kernel forgets it. A link back up the tree is walked once."""
    digest = hashlib.sha256()
    seen: set[str] = set()
    for directory, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # `latest -> .`: os.walk would go round until ELOOP
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(directory, name)
            try:
                info = path.stat()
            except OSError:  # a dangling link: the loader ignores it too
                continue
            entry = (str(path.relative_to(root)), info.st_size, info.st_mtime_ns)
            digest.update(repr(entry).encode())
    return digest.hexdigest()


def check_unchanged(root: Path) -> None:
    """In a worker, after its models loaded: the repository is the one the pod started with."""
    if _at_start is None:  # not under Gunicorn's master (the dev server, tests in process)
        return
    if fingerprint(root) != _at_start:
        raise ModelLoadError(
            f"model repository {root} changed on disk since the pod started; a pod serves one "
            "repository for its whole life, so that its workers answer alike: restart the pod "
            "(a rollout) to serve the change"
        )


def gunicorn_hooks(root: Path) -> dict[str, Any]:
    def take(server: Any) -> None:
        global _at_start
        _at_start = fingerprint(root)

    return {"on_starting": take, "on_reload": take}
