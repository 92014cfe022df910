"""An exclusive, non-blocking `flock` on a file that is still linked: how a worker takes a
spool segment to replay or a dead worker's journal to recover. The kernel drops the lock of
a dead process, so a file whose lock is free has no live owner; checking the inode after the
lock tells a file removed (replayed, recovered) by another worker meanwhile."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def lock_linked(path: Path) -> int | None:
    """The file opened read-only and locked, or None if another process holds its lock or it
    is gone. On any other error (ENOLCK, ENOMEM, EMFILE) no descriptor is left open: a
    leaked one would hold the lock, and keep the file from every worker, for this process's
    life."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):  # its owner is alive; removed meanwhile
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None
