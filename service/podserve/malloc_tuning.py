"""glibc's malloc, told to give large buffers back to the OS when they are freed.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with its own mmap, unmapped on
free; smaller ones come from its heaps, which keep freed memory for reuse. The threshold
starts at 128 KiB but is dynamic: each freed mmapped chunk raises it to that chunk's size (up
to 32 MiB). After one 16 MiB request body, later 16 MiB bodies came from the heap, and a burst
of them left a worker at 2158 MiB RSS long after it ended (106 MiB with the threshold fixed:
the /tmp/memory review's gzip burst). Setting the threshold fixes it (glibc then stops raising
it): buffers of request-body size are unmapped on free, and smaller ones stay on the heap.
At the default 1 MiB a MiniLM batch of 8, whose arrays are a few MB, cost the same in-process
(median 19.8 ms, glibc's default 20.2 ms; a noisy 2-core machine).

Set in the Gunicorn master before the workers fork (they inherit it): PODSERVE_MALLOC_MMAP_
THRESHOLD_BYTES, 0 to leave glibc's default. Not glibc (musl), or no ctypes: logged once, and
the server goes on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3


def set_mmap_threshold(threshold_bytes: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold_bytes) in this process; False (logged) where it
    cannot be done. 0 does nothing."""
    if threshold_bytes <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt  # AttributeError where the C library has none (musl)
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        done = mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
        # Fixing the mmap threshold fixes the trim threshold too, at its 128 KiB default: the
        # heap's top was given back and taken again over and over (tabular over HTTP, c=32:
        # req/s x0.94). Twice the mmap threshold, as glibc's dynamic rule sets it, costs
        # nothing measurable (2, 8 and 64 MiB alike, 4 interleaved rounds) and keeps at most
        # that much free at the top of each malloc arena (there is one per thread that
        # allocates: 64 MiB each kept 300 MiB in a 5-thread test).
        done = done and mallopt(M_TRIM_THRESHOLD, 2 * threshold_bytes) == 1
    except (OSError, AttributeError) as exc:
        log.warning("PODSERVE_MALLOC_MMAP_THRESHOLD_BYTES not applied: no glibc mallopt (%s)", exc)
        return False
    if not done:
        log.warning(
            "PODSERVE_MALLOC_MMAP_THRESHOLD_BYTES not applied: mallopt refused %d",
            threshold_bytes,
        )
        return False
    log.info("malloc mmap threshold set", extra={"mmap_threshold_bytes": threshold_bytes})
    return True


def gunicorn_hooks(threshold_bytes: int) -> dict[str, Any]:
    """In the master, before any worker forks: the workers inherit the setting."""

    def on_starting(server: Any) -> None:
        set_mmap_threshold(threshold_bytes)

    return {"on_starting": on_starting}
