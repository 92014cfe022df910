"""Replays a signal handler arriving at every point of running code.

Python runs a signal handler between two bytecodes of the main thread, also inside another
handler's run. `run_with_nested(outer, inner)` runs `outer` and, at a line that it (or
anything it calls in Python) executes, or at every one, runs `inner` to completion there,
as a signal that arrived at that moment would. Deterministic, unlike timing real signals.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any


def run_with_nested(
    outer: Callable[[], None], inner: Callable[[], None], at: int | None = None
) -> int:
    """Run outer with inner nested at its line number `at` (counted from 0 over every line
    outer runs), or at each of its lines (None). Returns how many lines outer ran."""
    nested = False
    lines = 0

    def trace(_frame: FrameType, event: str, _arg: Any) -> Any:
        nonlocal nested, lines
        if event == "line" and not nested:
            if at is None or lines == at:
                nested = True
                try:
                    inner()
                finally:
                    nested = False
            lines += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        outer()
    finally:
        sys.settrace(previous)
    return lines
