"""Fixtures for the PostgreSQL tests: one server per session, a fresh database per module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))

import postgres
from model_builders import affine_model, save, slow_model
from tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def empty_db(pg_server: postgres.PostgresServer) -> Iterator[str]:
    """A fresh database for this module only (no schema)."""
    with postgres.fresh_database(pg_server.admin_url) as url:
        yield url


@pytest.fixture(scope="module")
def db_url(empty_db: str) -> str:
    """A fresh, migrated database for this module only."""
    postgres.migrate(empty_db)
    return empty_db


@pytest.fixture(scope="module")
def proxy(db_url: str) -> Iterator[TcpProxy]:
    with TcpProxy(*postgres.host_port(db_url)) as tcp:
        yield tcp


@pytest.fixture(scope="module")
def proxied_url(db_url: str, proxy: TcpProxy) -> str:
    """The module's database, reached through a proxy the test can cut."""
    return postgres.with_port(db_url, proxy.port)


@pytest.fixture(scope="session")
def db_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """affine (v1: 2x+1, v2: 3x; FP32 [n, 4]) and slow (FP32 [n, 256], tens of ms a row)."""
    repo = tmp_path_factory.mktemp("db-models")
    save(affine_model(2.0, 1.0), repo, "affine", 1, {"max_batch_size": 16})
    save(affine_model(3.0, 0.0), repo, "affine", 2)
    save(slow_model(), repo, "slow", 1, {"max_batch_size": 8})
    return repo
