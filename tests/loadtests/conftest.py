"""The load-test checks import `loadtests.*` from the repository root; shared servers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_process import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shedding_server(model_repo: Path) -> Iterator[ServerProcess]:
    """A podserve whose database is down: every entity request is answered 503 with
    `Retry-After: 1` (the breaker's reset), always, so client back-off can be counted."""
    env = {
        "PODSERVE_DATABASE_URL": f"postgresql://podserve@127.0.0.1:{free_port()}/none",
        "PODSERVE_DB_BREAKER_RESET_S": "1",
    }
    with ServerProcess(model_repo, workers=1, env=env) as server:
        yield server
