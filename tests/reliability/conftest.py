"""Fixtures for the reliability suite: figures reported per scenario, PostgreSQL databases.

Every scenario reports what it measured through the `report` fixture: one JSON line on
stdout (`pytest -s` shows it) and, when PODSERVE_RELIABILITY_REPORT names a file, appended
there too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
for path in (HERE, HERE.parent, HERE.parent.parent / "loadtests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import postgres  # noqa: E402 - tests/postgres.py, the database engineer's helpers

REPORT_ENV = "PODSERVE_RELIABILITY_REPORT"

Report = Callable[..., None]


@pytest.fixture()
def report(request: pytest.FixtureRequest) -> Report:
    def write(scenario: str, **figures: Any) -> None:
        line = json.dumps({"scenario": scenario, "test": request.node.name, **figures}, default=str)
        print(f"\nRELIABILITY {line}")
        target = os.environ.get(REPORT_ENV)
        if target:
            with open(target, "a", encoding="utf-8") as out:
                out.write(line + "\n")

    return write


@pytest.fixture(scope="module")
def rel_db(pg_server: postgres.PostgresServer) -> Iterator[str]:
    """A fresh, migrated database for one test module."""
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        yield url
