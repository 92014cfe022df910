"""The test-database fallback chain (README, "PostgreSQL"): its last resort, a throwaway cluster."""

from __future__ import annotations

import os

import pytest

import postgres
from podserve.db.migrations import packaged_migrations


def test_throwaway_cluster_starts_migrates_and_goes_away() -> None:
    bindir = postgres._find_bindir()
    if bindir is None:
        # Only acceptable where the suite has a server without the fallback; with neither,
        # this is the missing install step, so fail with the hint instead of skipping.
        in_use = os.environ.get(postgres.ENV_URL) or postgres.DEFAULT_URL
        if postgres.reachable(in_use) is not None:
            pytest.fail(f"no PostgreSQL server binaries and no server: {postgres.HINT}")
        pytest.skip(
            "the throwaway-cluster fallback needs PostgreSQL server binaries (initdb), which "
            f"are not installed; unused here: the suite runs against the server at {in_use}"
        )
    server = postgres._start_cluster(bindir)
    try:
        assert postgres.reachable(server.admin_url) is None
        with postgres.fresh_database(server.admin_url) as url:
            packaged = [migration.version for migration in packaged_migrations()]
            assert postgres.migrate(url) == packaged
            assert postgres.scalar(url, "SELECT count(*) FROM podserve_jobs") == 0
    finally:
        server.stop()
    assert postgres.reachable(server.admin_url, timeout=1) is not None


def test_urls_are_rewritten_for_the_proxy() -> None:
    url = "postgresql://app:s3cret@db.example:5432/test?sslmode=disable"
    assert postgres.with_port(url, 6000) == (
        "postgresql://app:s3cret@127.0.0.1:6000/test?sslmode=disable"
    )
    assert postgres.with_database(url, "other").endswith("@db.example:5432/other?sslmode=disable")
    assert postgres.host_port("postgresql://postgres@127.0.0.1/x") == ("127.0.0.1", 5432)
