"""Shared fixtures: model repositories on disk and real podserve servers."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import postgres
from model_builders import affine_model, build_test_repository, save
from server_process import ServerProcess


@pytest.fixture()
def ipv6_loopback() -> None:
    """Skips a test of IPv6 binding on a host whose kernel or network has no ::1."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.PostgresServer]:
    """The test PostgreSQL (see tests/postgres.py for how it is found or started)."""
    try:
        server = postgres.find_or_start()
    except postgres.NoPostgres as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny test models plus the two demo models (tabular classifier, text pipeline)."""
    from podserve.demo_models import build_demo_repository

    repo = tmp_path_factory.mktemp("models")
    build_test_repository(repo)
    build_demo_repository(repo)
    return repo


@pytest.fixture(scope="session")
def affine_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model (y = 2x + 1, [batch, 4]): a worker boots in a blink, for tests that
    start, recycle or stop servers many times."""
    repo = tmp_path_factory.mktemp("affine")
    save(affine_model(2.0, 1.0), repo, "affine", 1, {"max_batch_size": 16})
    return repo


@pytest.fixture(scope="session")
def server(model_repo: Path) -> Iterator[ServerProcess]:
    """One shared 2-worker server for tests that do not disturb it."""
    with ServerProcess(model_repo, workers=2) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
